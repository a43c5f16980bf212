"""Testing Durable Objects with pytest, on real NATS and Postgres (install ``durable[dev]``).

The plugin (``durable.testing.plugin``, registered with pytest on install) gives a test the
``durable_app`` fixture: the app of the nearest ``durable.toml`` running on a fresh database::

    async def test_counter(durable_app, env):
        assert (await durable_app.fetch("/counter/a/increment", method="POST")).status == 200
        assert await env.COUNTERS.get_by_name("a").get() == 1
        await durable_app.evict(env.COUNTERS.get_by_name("a"))   # next call: a new instance
        await durable_app.run_alarm(stub)                        # run its alarm now
"""

from .app import DurableApp, DurableServers

__all__ = ["DurableApp", "DurableServers"]
