"""/healthz and /metrics."""

import asyncio
import json
import threading

import pytest
from django.db import connection
from django.test import Client

from chat import health
from chat.runtime import get_runtime
from chatproject.dbthread import database_thread
from tests.asgi_http import call
from tests.chat.helpers import join, send, sync
from tests.factories import make_room, make_user
from tests.ws import communicator, receive_until


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# The probe reads on a connection of its own (chat.health), which sees only what is committed.
@pytest.mark.django_db(transaction=True)
def test_healthz_reports_database_and_channel_layer():
    response = Client().get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["channel_layer"]["ok"] is True
    assert response["Cache-Control"] == "no-store"


@pytest.fixture
async def held_database_thread():
    """The database thread (every sync view and socket query, chatproject/dbthread.py) kept
    busy, as a stuck query would keep it."""
    release = threading.Event()
    holders = []

    async def hold():
        started = threading.Event()

        def stuck():
            started.set()
            release.wait(timeout=30)

        holders.append(asyncio.ensure_future(database_thread.run(stuck)))
        assert await asyncio.to_thread(started.wait, 30)
        return holders[-1]

    yield hold
    release.set()
    await asyncio.gather(*holders)


@pytest.fixture
def stuck_database(monkeypatch):
    """The database probe's SELECT never comes back (until the test ends). The probes keep
    their real time limit: at 0.3 s, the channel layer's check once failed on a slow host."""
    stopped = threading.Event()
    monkeypatch.setattr(health, "_select_one", lambda: stopped.wait(timeout=30))
    yield
    stopped.set()
    health._PROBE_THREAD.submit(lambda: None).result(timeout=5)  # the stuck probe came back


async def healthz() -> tuple[int, dict]:
    from chatproject.asgi import application

    sent = await asyncio.wait_for(call(application, "GET", "/healthz"), timeout=10)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.mark.django_db(transaction=True)
async def test_healthz_answers_while_a_stuck_query_holds_the_database_thread(
    held_database_thread,
):
    holder = await held_database_thread()
    status, body = await healthz()
    assert not holder.done()
    assert (status, body["checks"]["database"]["ok"]) == (200, True)


@pytest.mark.django_db(transaction=True)
async def test_healthz_probes_on_a_connection_it_closes():
    status, _ = await healthz()
    assert status == 200
    closed = health._PROBE_THREAD.submit(lambda: connection.connection is None).result(timeout=5)
    assert closed


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("stuck_database")
async def test_healthz_is_503_when_the_database_stops_answering():
    status, body = await healthz()
    assert status == 503
    assert body["checks"]["database"] == {"ok": False, "error": "TimeoutError"}
    assert body["checks"]["channel_layer"]["ok"] is True, body
    # The stuck probe still holds its thread: the next check fails at once, and takes no other
    # thread to wait for the database.
    status, body = await healthz()
    assert status == 503
    assert body["checks"]["database"] == {"ok": False, "error": "PreviousProbeRunning"}


@pytest.mark.django_db(transaction=True)
def test_healthz_is_503_when_the_channel_layer_is_down(settings):
    # A real Redis layer pointed at a port where nothing listens.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]},
        }
    }
    response = Client().get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["channel_layer"]["ok"] is False
    assert body["checks"]["database"]["ok"] is True


async def test_the_channel_layer_probe_answers_while_the_hub_waits_for_room_events(
    monkeypatch, redis_layers
):
    # On Redis a process-specific channel waits for the layer's one receive lock, which an idle
    # hub holds without end: a probe on such a channel timed out, and /healthz said 503.
    layer = redis_layers()
    monkeypatch.setattr(health, "get_channel_layer", lambda: layer)
    hub = asyncio.ensure_future(layer.receive(await layer.new_channel("chathub")))
    try:
        await asyncio.sleep(0.3)  # the hub's blocking pop is under way, holding the lock
        assert not hub.done()
        for _ in range(3):
            found = await health._check(health._channel_layer)
            assert found["ok"] is True, found
    finally:
        hub.cancel()
        await asyncio.gather(hub, return_exceptions=True)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("remote", "forwarded", "token", "status"),
    [
        ("127.0.0.1", None, None, 200),
        ("203.0.113.5", None, None, 403),
        # A public client relayed by the local proxy is not loopback.
        ("127.0.0.1", "203.0.113.5", None, 403),
        ("203.0.113.5", None, "s3cret-metrics-token", 200),
        ("203.0.113.5", None, "wrong", 403),
    ],
)
def test_metrics_are_not_public(settings, remote, forwarded, token, status):
    settings.CHAT_TRUSTED_PROXIES = ["127.0.0.1"]
    settings.CHAT_METRICS_TOKEN = "s3cret-metrics-token"
    headers = {"REMOTE_ADDR": remote}
    if forwarded:
        headers["HTTP_X_FORWARDED_FOR"] = forwarded
    if token:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    assert Client().get("/metrics", **headers).status_code == status


@pytest.mark.django_db(transaction=True)
async def test_metrics_count_connections_messages_and_deliveries():
    def scrape() -> str:
        return Client().get("/metrics").content.decode()

    alice, bob = await sync(make_user)("alice"), await sync(make_user)("bob")
    room = await sync(make_room)("lobby")
    before = await sync(scrape)()
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    refused = communicator("/ws/rooms/lobby/", ticket="forged")
    await refused.connect()
    await refused.disconnect()
    await send(a, type="message", body="hi", client_id="m1")
    await receive_until(b, "message")
    await a.send_to(text_data="not json")
    await receive_until(a, "error")
    await get_runtime().audit.flush()  # message events count once recorded
    during = await sync(scrape)()
    await a.disconnect()
    await b.disconnect()
    await get_runtime().audit.flush()
    after = await sync(scrape)()

    def delta(text, name, **labels):
        return sample(text, name, **labels) - sample(before, name, **labels)

    assert delta(during, "chat_connection_attempts_total", outcome="accepted", reason="") == 2
    assert (
        delta(during, "chat_connection_attempts_total", outcome="rejected", reason="ticket_invalid")
        == 1
    )
    assert delta(during, "chat_connections_open") == 2
    assert delta(after, "chat_connections_open") == 0
    assert delta(during, "chat_message_events_total", event="sent", reason="") == 1
    assert delta(during, "chat_message_events_total", event="rejected", reason="invalid_frame") == 1
    assert delta(during, "chat_deliveries_total") >= 2
    assert delta(during, "chat_delivery_latency_seconds_count") >= 1


@pytest.mark.django_db(transaction=True)
def test_metrics_count_a_message_once_when_its_store_is_retried(monkeypatch):
    # Another process stores the same client_id between the check and the insert: the batch
    # rolls back and is stored again (services.message_store_many). One message was sent.
    from django.db import IntegrityError
    from prometheus_client import REGISTRY

    from chat import services, sql
    from chat.models import Message, MessageLog

    alice = make_user("alice")
    room = make_room("lobby", owner=alice)
    insert_many, raced = sql.insert_many, []

    def race_once(rows):
        if rows and isinstance(rows[0], Message) and not raced:
            raced.append(True)
            raise IntegrityError("duplicate key value violates unique constraint")
        return insert_many(rows)

    monkeypatch.setattr(sql, "insert_many", race_once)

    def sent() -> float:
        labels = {"event": "sent", "reason": ""}
        return REGISTRY.get_sample_value("chat_message_events_total", labels) or 0.0

    before = sent()
    result = services.message_send(room=room, author=alice, body="hi", client_id="m1")
    assert (raced, result.seq) == ([True], 1)
    assert MessageLog.objects.filter(event="sent").count() == 1
    assert sent() - before == 1


@pytest.mark.django_db(transaction=True)
async def test_healthz_checks_at_the_same_moment_all_answer_200():
    # Several health checkers (both proxies, a load balancer's nodes, a monitor) may ask a
    # process at once: the database answers them all, and none is a reason to take it out.
    answers = await asyncio.gather(healthz(), healthz(), healthz())
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert all(body["checks"]["database"]["ok"] for _, body in answers)


@pytest.mark.django_db(transaction=True)
async def test_metrics_answer_while_a_stuck_query_holds_the_database_thread(
    held_database_thread,
):
    # A database stall is when the process's numbers matter most: a scrape needs no query,
    # and must not queue behind one.
    from chatproject.asgi import application

    holder = await held_database_thread()
    sent = await asyncio.wait_for(call(application, "GET", "/metrics"), timeout=5)
    assert not holder.done()
    assert sent[0]["status"] == 200
    assert b"chat_connections_open" in b"".join(m.get("body", b"") for m in sent[1:])
