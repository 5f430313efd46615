"""Several daphne processes on one Redis and one database: one deployment, global behaviour."""

import asyncio
import shutil
import signal
import subprocess
import time

import pytest
import redis
from asgiref.sync import sync_to_async

from chat.models import Message
from tests.e2e.client import ChatClient
from tests.e2e.resilient import ResilientClient
from tests.e2e.server import free_port
from tests.services import reachable_redis_url, service_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture
def redis_url() -> str:
    return reachable_redis_url()


def two_processes(server_factory, redis_url: str, **env):
    """Two daphne processes of one deployment: same database, Redis, key prefix and origins."""
    ports = [free_port(), free_port()]
    origins = ",".join(f"http://127.0.0.1:{port}" for port in ports)
    return [
        server_factory(port=port, REDIS_URL=redis_url, CHAT_ALLOWED_ORIGINS=origins, **env)
        for port in ports
    ]


async def test_processes_share_chat_and_presence(server_factory, redis_url, people):
    a_server, b_server = two_processes(server_factory, redis_url)
    async with (
        ChatClient(a_server.url, a_server.origin, "alice") as alice,
        ChatClient(b_server.url, b_server.origin, "bob") as bob,
    ):
        a = await alice.connect("lobby", a_server.ws_url(""))
        b = await bob.connect("lobby", b_server.ws_url(""))
        assert b.hello["presence"] == ["alice", "bob"]
        assert (await a.expect("presence"))["joined"] == "bob"
        await a.send(type="message", body="from A", client_id="a1")
        assert (await b.expect("message"))["body"] == "from A"
        assert (await a.expect("message"))["body"] == "from A"  # its own, first
        await b.send(type="message", body="from B", client_id="b1")
        assert (await a.expect("message"))["body"] == "from B"
        await b.send(type="typing")
        assert (await a.expect("typing"))["user"] == "bob"
        await b.close()
        assert (await a.expect("presence"))["left"] == "bob"
        await a.close()


async def test_a_killed_process_has_its_users_announced_gone_on_the_others(
    server_factory, redis_url, people
):
    """A process killed with SIGKILL closes nothing: its users leave the other processes' lists
    when their leases lapse, by the survivors' heartbeat sweep (docs/deploy.md). Short leases
    here, so that it takes seconds rather than the default two minutes."""
    a_server, b_server = two_processes(
        server_factory, redis_url, CHAT_HEARTBEAT="0.5", CHAT_PRESENCE_LEASE="1.5"
    )
    async with (
        ChatClient(a_server.url, a_server.origin, "alice") as alice,
        ChatClient(b_server.url, b_server.origin, "bob") as bob,
    ):
        await alice.connect("lobby", a_server.ws_url(""))
        b = await bob.connect("lobby", b_server.ws_url(""))
        assert b.hello["presence"] == ["alice", "bob"]
        # Several leases later alice is still listed: her process renews them.
        await asyncio.sleep(3)
        later = await bob.connect("lobby", b_server.ws_url(""))
        assert later.hello["presence"] == ["alice", "bob"]
        await later.close()

        a_server.stop(signal.SIGKILL)
        left = await b.expect("presence", timeout=30)
        assert left["left"] == "alice"
        assert [f for f in b.seen if f["type"] == "presence"] == [left]  # announced once
        again = await bob.connect("lobby", b_server.ws_url(""))
        assert again.hello["presence"] == ["bob"]


async def test_revocation_reaches_every_process(server_factory, redis_url, people):
    a_server, b_server = two_processes(server_factory, redis_url)
    async with (
        ChatClient(a_server.url, a_server.origin, "alice") as alice,
        ChatClient(b_server.url, b_server.origin, "bob") as bob,
    ):
        on_a = await bob.connect("lobby", a_server.ws_url(""))
        on_b = await bob.connect("lobby", b_server.ws_url(""))
        kicked = await alice.http.delete("/api/rooms/lobby/members/bob/", headers=alice.auth)
        assert kicked.status_code == 204
        # Pushed to both processes: nothing else closes a socket for a lost membership (chat.hub's
        # heartbeat does not read memberships). How fast is not a test's to assert: the bench
        # measures the latency of the same path (a publish to the room, each process's hub).
        assert await on_a.closed() == (4403, "removed")
        assert await on_b.closed() == (4403, "removed")


async def test_limits_are_global(server_factory, redis_url, people):
    a_server, b_server = two_processes(
        server_factory,
        redis_url,
        CHAT_MAX_SOCKETS_PER_USER="2",
        CHAT_MESSAGE_RATE="0.01",
        CHAT_MESSAGE_BURST="3",
    )
    async with ChatClient(a_server.url, a_server.origin, "alice") as alice:
        on_a = await alice.connect("lobby", a_server.ws_url(""))
        on_b = await alice.connect("lobby", b_server.ws_url(""))
        # A third socket is one too many, whichever process it reaches.
        ticket = await alice.ticket("lobby")
        import websockets

        third = await websockets.connect(
            a_server.ws_url(ticket["ws_url"]),
            subprotocols=["chat.v1", f"ticket.{ticket['ticket']}"],
            origin=a_server.origin,
        )
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await third.recv()
        assert closed.value.rcvd.code == 4429
        # One message bucket for both sockets.
        for sock, client_id in [(on_a, "m1"), (on_b, "m2"), (on_a, "m3")]:
            await sock.send(type="message", body="hi", client_id=client_id)
            await sock.expect("ack")
        await on_b.send(type="message", body="one too many", client_id="m4")
        assert (await on_b.expect("error"))["code"] == "rate_limited"
        await on_a.close()
        await on_b.close()


async def test_login_limits_hold_across_processes(server_factory, redis_url, people):
    """Guesses at one account, at once, spread over two processes: exactly the limit reaches
    the password check, the rest get 429 with Retry-After. (The race this rules out is rare
    with two processes and a slow password check; tests/accounts/test_throttling.py provokes
    it: DRF's own throttle let 24 of 24 simultaneous requests through a limit of 5.)"""
    import httpx

    servers = two_processes(
        server_factory,
        redis_url,
        CHAT_LOGIN_RATE_PER_USERNAME="4/min",
        CHAT_LOGIN_RATE_PER_IP="1000/min",
    )
    clients = [httpx.AsyncClient(base_url=server.url, timeout=30) for server in servers]
    try:
        guess = {"username": "alice", "password": "not-her-password"}
        answers = await asyncio.gather(
            *(clients[i % 2].post("/api/auth/token/", json=guess) for i in range(16))
        )
    finally:
        for client in clients:
            await client.aclose()
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [401] * 4 + [429] * 12
    assert all(int(a.headers["Retry-After"]) > 0 for a in answers if a.status_code == 429)


# --- a Redis restart ------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of our own, so a test may kill and restart it without harming anyone."""
    binary = shutil.which("redis-server")
    if binary is None:
        service_unavailable("redis-server is not installed")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
               "--save", "", "--appendonly", "no"]  # fmt: skip

    class Server:
        url = f"redis://127.0.0.1:{port}/0"
        process: subprocess.Popen | None = None

        def start(self):
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 5
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

        def kill(self):
            self.process.kill()
            self.process.wait()

    server = Server()
    server.start()
    yield server
    server.kill()


async def test_redis_restart_loses_and_doubles_nothing(server_factory, private_redis, people):
    a_server, b_server = two_processes(server_factory, private_redis.url, CHAT_MESSAGE_BURST="1000")
    alice = ResilientClient(a_server.url, a_server.ws_url(""), a_server.origin, "alice", "lobby")
    bob = ResilientClient(b_server.url, b_server.ws_url(""), b_server.origin, "bob", "lobby")
    for client in (alice, bob):
        client.start()
    try:
        await alice.wait_until(lambda: alice.connects, timeout=10)
        await bob.wait_until(lambda: bob.connects, timeout=10)
        sent = [await alice.send(f"before {i}") for i in range(5)]
        await bob.wait_for_seq(5, timeout=10)

        private_redis.kill()
        # Typed while the service is down: kept in the outbox (or stored and acked already).
        for i in range(10):
            sent.append(await alice.send(f"during {i}"))
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        private_redis.start()

        sent += [await alice.send(f"after {i}") for i in range(5)]
        await alice.wait_for_seq(20, timeout=30)
        await bob.wait_for_seq(20, timeout=30)
    finally:
        await alice.stop()
        await bob.stop()

    stored = await sync_to_async(
        lambda: list(Message.objects.order_by("seq").values_list("seq", "client_id", "body"))
    )()
    assert [seq for seq, _, _ in stored] == list(range(1, 21)), "exactly 20 messages, gap-free"
    assert sorted(cid for _, cid, _ in stored) == sorted(sent), "each stored once"
    for client in (alice, bob):
        # Merged by seq: history and live may overlap, the view never shows a message twice.
        assert sorted(client.messages) == list(range(1, 21))
        assert [client.messages[s]["body"] for s in range(1, 21)] == [body for _, _, body in stored]
    assert alice.outbox == {}
    # The outage was noticed: sockets closed (1013) and clients reconnected.
    assert alice.connects >= 2
    assert bob.connects >= 2
