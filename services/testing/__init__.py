"""Testing Durable Objects with pytest: the plugin the package registers (``durable.testing.plugin``)."""
