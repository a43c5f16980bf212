"""The SQL schema migrations, applied in name order at start-up (package data: read with importlib.resources)."""
