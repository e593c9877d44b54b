"""transcode."""
