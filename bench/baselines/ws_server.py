"""A bare `websockets` broadcast server: a frame goes, as received, to every socket on its path."""

import argparse
import asyncio
import signal
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, broadcast, serve

rooms: defaultdict[str, set[ServerConnection]] = defaultdict(set)


async def handler(ws: ServerConnection) -> None:
    room = rooms[ws.request.path]
    room.add(ws)
    try:
        async for message in ws:
            broadcast(room, message)
    finally:
        room.discard(ws)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--origin", action="append", default=[])
    args = parser.parse_args()
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    # The same frame limit and keepalive as `manage.py serve` gives daphne.
    async with serve(
        handler,
        args.bind,
        args.port,
        origins=args.origin or None,
        max_size=64 * 1024,
        ping_interval=20,
        ping_timeout=30,
    ):
        await stop


if __name__ == "__main__":
    asyncio.run(main())
