"""The pytest plugin shipped with durable (registered through the ``pytest11`` entry point)."""
