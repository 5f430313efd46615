"""Clients that stop reading or stop answering are dropped, and the audit trail says so."""

import asyncio
import json
import socket

import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.models import ConnectionLog
from tests.e2e.client import ChatClient

pytestmark = pytest.mark.e2e


async def connect_without_reading(client: ChatClient, server) -> websockets.ClientConnection:
    """A socket that authenticates, then never reads again: tiny receive buffer, tiny queue."""
    ticket = await client.ticket("lobby")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    ws = await websockets.connect(
        server.ws_url(ticket["ws_url"]),
        sock=sock,
        subprotocols=["chat.v1", f"ticket.{ticket['ticket']}"],
        origin=server.origin,
        max_queue=1,
        ping_interval=None,
    )
    await ws.recv()  # hello; nothing more is ever read
    return ws


async def connection_row(username: str, timeout: float = 10.0) -> ConnectionLog:
    """The user's connection row once its close has been written."""
    async with asyncio.timeout(timeout):
        while True:
            row = await sync_to_async(
                lambda: ConnectionLog.objects.filter(
                    username=username, closed_at__isnull=False
                ).first()
            )()
            if row is not None:
                return row
            await asyncio.sleep(0.1)


async def test_a_reader_that_stops_reading_is_dropped_and_the_room_goes_on(server_factory, people):
    server = server_factory(
        CHAT_SLOW_CLIENT_TIMEOUT="1",
        CHAT_SLOW_CLIENT_MAX_BYTES="262144",
        CHAT_MESSAGE_RATE="10000",
        CHAT_MESSAGE_BURST="10000",
    )
    async with (
        ChatClient(server.url, server.origin, "alice") as alice,
        ChatClient(server.url, server.origin, "bob") as bob,
    ):
        stalled = await connect_without_reading(bob, server)
        sender = await alice.connect("lobby", server.ws_url(""))
        body = "x" * 3900
        # About 6 MB for the stalled reader: more than the kernel's socket buffers hold.
        for i in range(1500):
            await sender.ws.send(
                json.dumps({"type": "message", "body": body, "client_id": f"s{i}"})
            )
        for _ in range(1500):
            await sender.expect("ack", timeout=20)
        row = await connection_row("bob")
        assert row.close_code == 1008, "dropped as a slow reader"
        assert row.messages_sent < 1500
        await sender.close()
        stalled.transport.abort()


async def test_a_half_open_connection_is_closed_by_the_keepalive(server_factory, people):
    server = server_factory(CHAT_PING_INTERVAL="1", CHAT_PING_TIMEOUT="1")
    async with ChatClient(server.url, server.origin, "bob") as bob:
        ticket = await bob.ticket("lobby")
        sock = socket.create_connection(("127.0.0.1", server.port))
        ws = await websockets.connect(
            server.ws_url(ticket["ws_url"]),
            sock=sock,
            subprotocols=["chat.v1", f"ticket.{ticket['ticket']}"],
            origin=server.origin,
            ping_interval=None,
        )
        await ws.recv()
        # Gone silent: the client's process is frozen (its machine lost power, say), so it no
        # longer reads and never answers a ping.
        ws.transport.pause_reading()
        row = await connection_row("bob", timeout=15)
        # No pong within the timeout: the server drops the connection (1006, no close handshake).
        assert row.close_code == 1006
        assert row.outcome == "accepted"
        ws.transport.abort()
