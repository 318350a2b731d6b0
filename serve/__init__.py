"""The Ray Serve personalization application (see README: serving)."""
