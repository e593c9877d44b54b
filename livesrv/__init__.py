"""livesrv."""
