"""scripts/soak: a soak test of the real edgekb server behind a bad link (see __main__.py)."""
