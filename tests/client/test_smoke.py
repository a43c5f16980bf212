from durable.client import Env
from durable.objects import Worker


async def test_counter_increments_over_a_stub(worker: Worker, env: Env) -> None:
    stub = env.COUNTERS.get_by_name("smoke")
    assert await stub.increment() == 1
    assert await stub.increment(5) == 6
    assert await stub.increment(by=2) == 8
    assert await stub.get() == 8
