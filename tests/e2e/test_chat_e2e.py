"""The chat over a real daphne process and real sockets (the `websockets` client)."""

import asyncio
import json
import signal
import socket

import httpx
import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.models import ConnectionLog, Message
from tests.e2e.client import ChatClient

pytestmark = pytest.mark.e2e


async def test_conversation_end_to_end(daphne, people):
    ws_base = daphne.ws_url("")
    async with (
        ChatClient(daphne.url, daphne.origin, "alice") as alice,
        ChatClient(daphne.url, daphne.origin, "bob") as bob,
    ):
        a = await alice.connect("lobby", ws_base)
        b = await bob.connect("lobby", ws_base)
        assert a.hello["role"] == "owner"
        assert b.hello["presence"] == ["alice", "bob"]
        assert (await a.expect("presence"))["joined"] == "bob"

        # message -> ack first, then the broadcast to everyone
        await a.send(type="message", body="hello bob", client_id="m1")
        assert await a.expect("ack") == {"type": "ack", "client_id": "m1", "seq": 1}
        assert (await b.expect("message"))["body"] == "hello bob"
        assert (await a.expect("message"))["seq"] == 1

        # idempotent client_id after a "dropped ack"
        await a.send(type="message", body="hello bob", client_id="m1")
        assert (await a.expect("ack"))["seq"] == 1

        # typing reaches the other side only
        await b.send(type="typing")
        assert (await a.expect("typing"))["user"] == "bob"

        # history, then delete -> tombstone
        await b.send(type="message", body="second", client_id="b1")
        await b.expect("ack")
        await b.send(type="history", after=0, limit=10)
        history = await b.expect("history")
        assert [m["seq"] for m in history["messages"]] == [1, 2]
        await b.send(type="delete", seq=2)
        assert (await a.expect("deleted"))["seq"] == 2
        await a.send(type="history", after=1)
        assert (await a.expect("history"))["messages"][0]["deleted"] is True

        # kick: bob's socket closes with 4403 and the reason, pushed (nothing polls memberships)
        kicked = await alice.http.delete("/api/rooms/lobby/members/bob/", headers=alice.auth)
        assert kicked.status_code == 204
        assert await b.closed() == (4403, "removed")
        assert (await a.expect("presence"))["left"] == "bob"
        # and he cannot come back with a new ticket... in a public room he can, as a non-member
        await a.close()
    assert await sync_to_async(Message.objects.filter(client_id="m1").count)() == 1


async def test_resume_after_disconnect_loses_nothing_and_doubles_nothing(server_factory, people):
    daphne = server_factory(CHAT_MESSAGE_BURST="1000")
    ws_base = daphne.ws_url("")
    async with (
        ChatClient(daphne.url, daphne.origin, "alice") as alice,
        ChatClient(daphne.url, daphne.origin, "bob") as bob,
    ):
        b = await bob.connect("lobby", ws_base)
        max_seq = b.hello["last_seq"]
        await b.close()

        a = await alice.connect("lobby", ws_base)
        for i in range(100):
            await a.send(type="message", body=f"n{i}", client_id=f"n{i}")
        acks = [await a.expect("ack", timeout=10) for _ in range(100)]
        assert [x["seq"] for x in acks] == list(range(1, 101))

        b = await bob.connect("lobby", ws_base)
        # live traffic continues during the catch-up
        await a.send(type="message", body="live", client_id="live")
        merged: dict[int, dict] = {}
        after = max_seq
        while True:
            await b.send(type="history", after=after, limit=40)
            page = await b.expect("history")
            for message in page["messages"]:
                merged.setdefault(message["seq"], message)
            after = max(merged) if merged else after
            if not page["has_more"]:
                break
        for frame in b.seen:
            if frame["type"] == "message":
                merged.setdefault(frame["seq"], frame)
        if 101 not in merged:
            merged[101] = await b.expect("message")
        assert sorted(merged) == list(range(1, 102))
        assert [merged[i]["body"] for i in range(1, 101)] == [f"n{i}" for i in range(100)]
        await a.close()
        await b.close()


async def test_close_reason_reaches_the_client(daphne, people):
    async with httpx.AsyncClient(base_url=daphne.url) as http:
        response = await http.get("/healthz")
        assert response.json()["status"] == "ok"
    ws = await websockets.connect(
        daphne.ws_url("/ws/rooms/lobby/?ticket=forged"), origin=daphne.origin
    )
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "authentication failed")


async def test_foreign_origin_gets_http_403_from_daphne(daphne, people):
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(daphne.ws_url("/ws/rooms/lobby/"), origin="http://evil.example")
    assert refused.value.response.status_code == 403


async def test_oversized_frame_is_closed_1009_by_daphne(server_factory, people):
    server = server_factory(CHAT_MAX_FRAME_BYTES="2048")
    async with ChatClient(server.url, server.origin, "alice") as alice:
        sock = await alice.connect("lobby", server.ws_url(""))
        await sock.ws.send(json.dumps({"type": "message", "body": "x" * 3000, "client_id": "big"}))
        code, _ = await sock.closed()
        assert code == 1009


async def test_sigterm_leaves_a_complete_audit_trail(server_factory, people):
    server = server_factory()
    async with ChatClient(server.url, server.origin, "alice") as alice:
        sock = await alice.connect("lobby", server.ws_url(""))
        await sock.send(type="message", body="last words", client_id="lw")
        await sock.expect("ack")
        # A request still arriving (its line and a header read, no application yet), as
        # there always are on a busy server, or an upgrade less than a second old: daphne's
        # shutdown raised KeyError on it, and Twisted then dropped every socket before the
        # consumers could say 1001 (clients saw 1006).
        with socket.create_connection(("127.0.0.1", server.port)) as arriving:
            arriving.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            await asyncio.sleep(0.2)
            assert server.stop(signal.SIGTERM) == 0
        assert await sock.closed() == (1001, "server going away")
    row = await sync_to_async(ConnectionLog.objects.get)(username="alice")
    assert row.outcome == "accepted"
    assert row.closed_at is not None, "the close was written before the process exited"
    assert row.close_code == 1001
    assert row.messages_received == 1


async def test_tickets_never_reach_the_server_log(server_factory, people):
    server = server_factory()
    async with ChatClient(server.url, server.origin, "alice") as alice:
        ticket = await alice.ticket("lobby")
        ws = await websockets.connect(
            server.ws_url(f"{ticket['ws_url']}?ticket={ticket['ticket']}"), origin=server.origin
        )
        await ws.recv()
        await ws.close()
        await asyncio.sleep(0.2)
        secrets = [ticket["ticket"], alice.access, alice.refresh]
    server.stop()
    log = server.log()
    assert "WSCONNECT" in log or "lobby" in log, "the access log is on"
    for secret in secrets:
        assert secret not in log
        assert secret.split(".")[2] not in log
