"""The bare hardware path: a nats-py responder that echoes each request, in its own process."""

import asyncio
import sys

import nats
from nats.aio.msg import Msg


async def main(url: str) -> None:
    nc = await nats.connect(url)

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=echo, pending_msgs_limit=200_000)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
