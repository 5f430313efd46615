"""The bench's load client closes its sockets as a client should, or every server measures its
protocol-error path instead of a close."""

import asyncio

from websockets.asyncio.server import serve

from bench.client import Books, Room, open_conn
from bench.servers import TARGETS


async def test_the_load_client_closes_with_a_normal_closure_that_the_server_echoes():
    closes = asyncio.get_running_loop().create_future()

    async def handler(ws):
        await ws.wait_closed()
        closes.set_result((ws.protocol.close_rcvd, ws.protocol.close_sent))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        conn = await open_conn(TARGETS["websockets"], Room("r"), Books(), port=port)
        conn.close()
        received, sent = await asyncio.wait_for(closes, 10)

    # picows's default close carries code 0, which RFC 6455 forbids: the server took no close
    # frame from it and answered 1002, a protocol error: (None, 1002).
    assert (getattr(received, "code", None), getattr(sent, "code", None)) == (1000, 1000)
