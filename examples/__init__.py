"""Example applications: each folder is an app of its own (a durable.toml, its routes, its tests),
and ``examples.routes`` serves them all together for the repository's own ``durable.toml``."""
