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


async def _seed(server, count: int, body: str) -> None:
    async with ChatClient(server.url, server.origin, "alice") as alice:
        sender = await alice.connect("lobby", server.ws_url(""))
        for i in range(count):
            await sender.send(type="message", body=body, client_id=f"s{i}")
        for _ in range(count):
            await sender.expect("ack", timeout=20)
        await sender.close()


async def test_a_reader_dropped_while_answering_it_is_audited_1008_not_1011(server_factory, people):
    """The drop can happen on the direct answer path (history), not only on the fan-out."""
    server = server_factory(
        CHAT_SLOW_CLIENT_TIMEOUT="100",
        CHAT_SLOW_CLIENT_MAX_BYTES="50000",
        CHAT_MESSAGE_RATE="10000",
        CHAT_MESSAGE_BURST="10000",
    )
    await _seed(server, 25, "x" * 2000)
    async with ChatClient(server.url, server.origin, "bob") as bob:
        stalled = await connect_without_reading(bob, server)
        for _ in range(200):
            try:
                await stalled.send(json.dumps({"type": "history", "limit": 100}))
            except websockets.ConnectionClosed:
                break
            await asyncio.sleep(0.02)
        row = await connection_row("bob")
        stalled.transport.abort()
    assert row.close_code == 1008
    assert "Exception inside application" not in server.log_path.read_text()


async def test_history_of_long_messages_comes_in_pages_within_the_frame_limit(
    server_factory, people
):
    """20 messages of 4,000 two-byte characters: 160 KB, over daphne's 64 KiB message limit,
    which autobahn also applies to what the server sends."""
    server = server_factory(CHAT_MESSAGE_RATE="10000", CHAT_MESSAGE_BURST="10000")
    await _seed(server, 20, "é" * 4000)
    async with ChatClient(server.url, server.origin, "bob") as bob:
        reader = await bob.connect("lobby", server.ws_url(""))
        seqs: list[int] = []
        pages = 0
        request: dict = {"type": "history", "limit": 50}
        while True:
            await reader.send(**request)
            page = await reader.expect("history")
            pages += 1
            size = len(json.dumps(page, ensure_ascii=False, separators=(",", ":")).encode())
            assert size <= 64 * 1024
            assert all(len(m["body"]) == 4000 for m in page["messages"])
            seqs = [m["seq"] for m in page["messages"]] + seqs
            if not page["has_more"]:
                break
            request = {"type": "history", "limit": 50, "before": seqs[0]}
        assert seqs == list(range(1, 21))
        assert pages > 1
        # Forward paging (what a resume does) cuts from the other end.
        await reader.send(type="history", after=0, limit=50)
        first = await reader.expect("history")
        assert first["has_more"] is True
        assert [m["seq"] for m in first["messages"]] == list(range(1, len(first["messages"]) + 1))
        await reader.close()


async def test_frames_written_while_a_reader_lags_arrive_whole_and_in_order(server_factory, people):
    """Every frame (answers, acks, the fan-out) tries the socket first and leaves the rest to
    Twisted; once anything is queued, later frames queue behind it. A reader with a 4 KB receive
    buffer that reads nothing for a while gets history pages far bigger than what the kernel
    takes at once, with acks and its own messages between them: each must arrive whole (a
    frame written past queued bytes would break the framing) and in order."""
    server = server_factory(CHAT_MESSAGE_RATE="10000", CHAT_MESSAGE_BURST="10000")
    await _seed(server, 20, "é" * 4000)
    async with ChatClient(server.url, server.origin, "bob") as bob:
        stalled = await connect_without_reading(bob, server)
        for i in range(3):
            await stalled.send(json.dumps({"type": "history", "after": 0, "limit": 50}))
            await stalled.send(
                json.dumps({"type": "message", "body": f"m{i}", "client_id": f"b{i}"})
            )
        await asyncio.sleep(1.0)  # the server writes what it can and queues the rest
        frames = []
        async with asyncio.timeout(10):
            while len(frames) < 9:  # 3 pages, 3 acks, 3 messages
                frame = json.loads(await stalled.recv())
                if frame["type"] != "presence":  # the seeding socket's leave may come late
                    frames.append(frame)
        await stalled.close()
    kinds = [f["type"] for f in frames]
    assert sorted(kinds) == ["ack"] * 3 + ["history"] * 3 + ["message"] * 3
    pages = [f for f in frames if f["type"] == "history"]
    first_page = [m["seq"] for m in pages[0]["messages"]]
    assert first_page == list(range(1, len(first_page) + 1))
    assert all([m["seq"] for m in page["messages"]] == first_page for page in pages)
    assert all(len(m["body"]) == 4000 for page in pages for m in page["messages"])
    acks = [f["seq"] for f in frames if f["type"] == "ack"]
    own = [f["seq"] for f in frames if f["type"] == "message"]
    assert acks == own == [21, 22, 23]
    for seq in own:  # a sender sees its ack before the broadcast of its message
        ack_at = next(i for i, f in enumerate(frames) if f["type"] == "ack" and f["seq"] == seq)
        message_at = next(
            i for i, f in enumerate(frames) if f["type"] == "message" and f["seq"] == seq
        )
        assert ack_at < message_at
