"""A scripted session of security events leaves exactly the audit rows it should, and no secret.

Each step says what it must add to the trail; at the end the trail must hold exactly that (no row
more, none less, the right fields), the chain must verify, and no password, ticket, JWT or cookie
may appear in any log record or in any column of the audit, ticket or refresh-token tables.
"""

import logging
from collections import Counter
from datetime import timedelta

import pytest
import time_machine
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.token_blacklist.models import OutstandingToken

from accounts.models import Ticket
from chat import audit, services
from chat.models import ConnectionLog, Membership, MessageLog, Room, SecurityEvent
from chat.runtime import get_runtime
from tests.chat.helpers import join, send, sync
from tests.factories import PASSWORD, make_member, make_room, make_ticket, make_user
from tests.ws import closed_with, communicator, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


class Script:
    """What the trail must hold, step by step, and every secret the session handled."""

    def __init__(self) -> None:
        self.connections: Counter = Counter()
        self.messages: Counter = Counter()
        self.events: Counter = Counter()
        self.secrets: set[str] = {PASSWORD}

    def keep(self, *values: str) -> None:
        for value in values:
            self.secrets.add(value)
            if value.count(".") == 2:  # a JWT: its signature alone is a secret too
                self.secrets.add(value.rsplit(".", 1)[1])


async def rejected(script: Script, reason: str, code: int, comm) -> None:
    """Connect, expect a close with `code`, and expect one rejected row for `reason`."""
    connected, refusal = await comm.connect()
    if connected:
        assert (await closed_with(comm))[0] == code
    else:  # refused before accepting: daphne answers the handshake with HTTP 403
        assert refusal == code
    await comm.disconnect()
    script.connections["rejected", reason] += 1


@pytest.fixture
def cast():
    alice, bob, carol, dave = (make_user(n) for n in ("alice", "bob", "carol", "dave"))
    lobby = make_room("lobby", owner=alice)
    make_member(lobby, bob)
    make_member(lobby, carol)
    secret = make_room("secret", visibility=Room.Visibility.PRIVATE, owner=alice)
    gone = make_room("gone", owner=alice, archived_at=timezone.now())
    return alice, bob, carol, dave, lobby, secret, gone


async def test_a_scripted_session_leaves_exactly_its_rows_and_no_secret(cast, caplog, settings):
    caplog.set_level(logging.DEBUG)
    settings.CHAT_MESSAGE_RATE, settings.CHAT_MESSAGE_BURST = 0.01, 3
    alice, bob, carol, dave, lobby, secret, gone = cast
    s = Script()

    # --- accounts: JWT login, a failed login, a session login, a logout --------------------------
    def jwt_flows():
        api = APIClient()
        tokens = api.post(
            "/api/auth/token/", {"username": "alice", "password": PASSWORD}, format="json"
        ).json()
        api.post(
            "/api/auth/token/", {"username": "alice", "password": "not-" + PASSWORD}, format="json"
        )
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
        ticket = api.post("/api/tickets/", {"room": "lobby"}, format="json").json()["ticket"]
        outsider = APIClient()
        dave_tokens = outsider.post(
            "/api/auth/token/", {"username": "dave", "password": PASSWORD}, format="json"
        ).json()
        outsider.credentials(HTTP_AUTHORIZATION=f"Bearer {dave_tokens['access']}")
        assert outsider.post("/api/tickets/", {"room": "secret"}, format="json").status_code == 403
        return tokens, ticket, dave_tokens

    tokens, alice_ticket, dave_tokens = await sync(jwt_flows)()
    s.keep(tokens["access"], tokens["refresh"], alice_ticket, "not-" + PASSWORD)
    s.keep(dave_tokens["access"], dave_tokens["refresh"])
    s.events["login_succeeded"] += 2
    s.events["login_failed"] += 1
    s.events["ticket_refused"] += 1

    browser = Client()

    def session_flows():
        browser.get("/login/")
        csrf = browser.cookies["csrftoken"].value
        browser.post(
            "/login/", {"username": "bob", "password": PASSWORD, "csrfmiddlewaretoken": csrf}
        )
        return browser.post(
            "/api/tickets/",
            {"room": "lobby"},
            content_type="application/json",
            HTTP_X_CSRFTOKEN=browser.cookies["csrftoken"].value,
        ).json()["ticket"]

    bob_ticket = await sync(session_flows)()
    s.keep(bob_ticket, browser.cookies["sessionid"].value, browser.cookies["csrftoken"].value)
    s.events["login_succeeded"] += 1

    # --- accepted connections, one per transport -------------------------------------------------
    a = communicator("/ws/rooms/lobby/", ticket=alice_ticket)
    assert (await a.connect())[0]
    await receive_until(a, "hello")
    b = communicator("/ws/rooms/lobby/", ticket=bob_ticket, transport="query")
    assert (await b.connect())[0]
    await receive_until(b, "hello")
    carol_ticket = await sync(make_ticket)(carol, lobby)
    s.keep(carol_ticket)
    c = communicator("/ws/rooms/lobby/", transport="first_frame", ticket=None)
    assert (await c.connect())[0]
    await c.send_json_to({"type": "auth", "ticket": carol_ticket})
    await receive_until(c, "hello")
    s.connections["accepted", ""] += 3

    # --- every rejection reason ------------------------------------------------------------------
    reused = communicator("/ws/rooms/lobby/", ticket=alice_ticket)
    await rejected(s, "ticket_reused", 4401, reused)
    await rejected(
        s, "origin_denied", 4403, communicator("/ws/rooms/lobby/", origin="http://evil.example")
    )
    await rejected(s, "ticket_invalid", 4401, communicator("/ws/rooms/lobby/", ticket="forged"))
    no_ticket = communicator("/ws/rooms/lobby/", transport="first_frame", ticket=None)
    await no_ticket.connect()
    await no_ticket.send_json_to({"type": "ping"})
    assert (await closed_with(no_ticket))[0] == 4401
    await no_ticket.disconnect()
    s.connections["rejected", "ticket_missing"] += 1
    # A short wait for this connection only: the first-frame logins above must not race it.
    usual_timeout, settings.CHAT_AUTH_TIMEOUT = settings.CHAT_AUTH_TIMEOUT, 0.2
    await rejected(
        s,
        "auth_timeout",
        4408,
        communicator("/ws/rooms/lobby/", transport="first_frame", ticket=None),
    )
    settings.CHAT_AUTH_TIMEOUT = usual_timeout
    for reason, user, room, ip, url in [
        ("ip_mismatch", dave, lobby, "198.51.100.1", "/ws/rooms/lobby/"),
        ("room_mismatch", dave, lobby, "127.0.0.1", "/ws/rooms/secret/"),
        ("forbidden", dave, secret, "127.0.0.1", "/ws/rooms/secret/"),
        ("not_found", dave, gone, "127.0.0.1", "/ws/rooms/gone/"),
    ]:
        token = await sync(make_ticket)(user, room)
        s.keep(token)
        code = {"forbidden": 4403, "not_found": 4404}.get(reason, 4401)
        await rejected(s, reason, code, communicator(url, ticket=token, ip=ip))
    later = timezone.now() + settings.CHAT_TICKET_LIFETIME + timedelta(seconds=1)
    expired = await sync(make_ticket)(dave, lobby)
    s.keep(expired)
    with time_machine.travel(later, tick=True):
        await rejected(s, "ticket_expired", 4401, communicator("/ws/rooms/lobby/", ticket=expired))
    inactive_user = await sync(make_user)("erin")
    inactive = await sync(make_ticket)(inactive_user, lobby)
    s.keep(inactive)
    await sync(type(inactive_user).objects.filter(pk=inactive_user.pk).update)(is_active=False)
    await rejected(s, "user_inactive", 4401, communicator("/ws/rooms/lobby/", ticket=inactive))
    settings.CHAT_MAX_SOCKETS_PER_USER = 1
    d, _ = await join(dave, lobby)
    s.connections["accepted", ""] += 1
    extra = await sync(make_ticket)(dave, lobby)
    s.keep(extra)
    await rejected(s, "too_many_connections", 4429, communicator("/ws/rooms/lobby/", ticket=extra))
    await d.disconnect()

    # --- message events ---------------------------------------------------------------------------
    await send(a, type="message", body="hello", client_id="m1")
    await receive_until(a, "ack")
    s.messages["sent", ""] += 1
    for frame, reason in [
        ({"type": "message", "body": "x" * 4001, "client_id": "m2"}, "too_long"),
        ({"type": "message", "client_id": "m3"}, "invalid_frame"),
        ({"type": "jump"}, "unknown_type"),
        ({"type": "delete", "seq": 99}, "not_found"),
    ]:
        await send(b, **frame)
        assert (await receive_until(b, "error"))["code"] == reason
        s.messages["rejected", reason] += 1
    await send(b, type="delete", seq=1)  # alice's message: bob may not
    assert (await receive_until(b, "error"))["code"] == "forbidden"
    s.messages["rejected", "forbidden"] += 1
    for i in range(3):
        await send(b, type="message", body="ok", client_id=f"b{i}")
        await receive_until(b, "ack")
        s.messages["sent", ""] += 1
    await send(b, type="message", body="too fast", client_id="b9")
    assert (await receive_until(b, "error"))["code"] == "rate_limited"
    s.messages["rejected", "rate_limited"] += 1
    await send(a, type="delete", seq=1)
    await receive_until(a, "deleted")
    s.messages["deleted", ""] += 1

    # --- moderation -------------------------------------------------------------------------------
    until = timezone.now() + timedelta(minutes=5)
    await sync(services.member_mute)(actor=alice, room=lobby, user=carol, until=until)
    s.events["member_muted"] += 1
    await receive_until(c, "membership")
    await send(c, type="message", body="can I?", client_id="c1")
    assert (await receive_until(c, "error"))["code"] == "muted"
    s.messages["rejected", "muted"] += 1
    await sync(services.membership_set_role)(actor=alice, room=lobby, user=bob, role="moderator")
    s.events["role_changed"] += 1
    await sync(services.member_ban)(actor=alice, room=lobby, user=carol, reason="spam")
    s.events["member_banned"] += 1
    assert (await closed_with(c))[0] == 4403
    await c.disconnect()
    await sync(services.member_remove)(actor=alice, room=lobby, user=bob)
    s.events["member_removed"] += 1
    assert (await closed_with(b))[0] == 4403
    await b.disconnect()
    await sync(services.room_archive)(actor=alice, room=lobby)
    s.events["room_archived"] += 1
    assert (await closed_with(a))[0] == 4404
    await a.disconnect()

    def logout():
        api = APIClient()
        assert (
            api.post("/api/auth/logout/", {"refresh": tokens["refresh"]}, format="json").status_code
            == 200
        )

    await sync(logout)()
    s.events["logout"] += 1

    # --- the trail holds exactly that -------------------------------------------------------------
    await get_runtime().audit.flush()

    def trail():
        connections = Counter(ConnectionLog.objects.values_list("outcome", "reason"))
        messages = Counter(MessageLog.objects.values_list("event", "reason"))
        events = Counter(SecurityEvent.objects.values_list("event", flat=True))
        unclosed = ConnectionLog.objects.filter(closed_at__isnull=True).count()
        return connections, messages, events, unclosed, audit.verify_chain()

    connections, messages, events, unclosed, verified = await sync(trail)()
    assert connections == s.connections
    assert messages == s.messages
    assert events == s.events
    assert unclosed == 0, "every connection's close was written"
    assert verified.ok, verified.problem

    rows = await sync(
        lambda: list(ConnectionLog.objects.filter(outcome="accepted").order_by("opened_at"))
    )()
    assert [(r.username, r.transport, r.room_slug) for r in rows[:3]] == [
        ("alice", "subprotocol", "lobby"),
        ("bob", "query", "lobby"),
        ("carol", "first_frame", "lobby"),
    ]
    assert [r.close_code for r in rows[:3]] == [4404, 4403, 4403]
    banned = await sync(SecurityEvent.objects.get)(event="member_banned")
    assert (banned.actor_name, banned.target_name, banned.room_slug, banned.reason) == (
        "alice",
        "carol",
        "lobby",
        "spam",
    )
    assert await sync(Membership.objects.filter(user=bob).exists)() is False

    # --- and no secret anywhere -------------------------------------------------------------------
    def stored_text() -> list[str]:
        texts = []
        for model in (ConnectionLog, MessageLog, SecurityEvent, Ticket, OutstandingToken):
            for row in model.objects.all():
                texts += [str(getattr(row, f.attname)) for f in model._meta.concrete_fields]
        return texts

    stored = await sync(stored_text)()
    logged = [r.getMessage() for r in caplog.records] + [r.exc_text or "" for r in caplog.records]
    assert logged, "log records were captured"
    for secret in sorted(s.secrets):
        assert not [t for t in stored if secret in t], f"a secret ({secret[:6]}...) is stored"
        assert not [t for t in logged if secret in t], f"a secret ({secret[:6]}...) was logged"
