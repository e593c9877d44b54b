"""gifts."""
