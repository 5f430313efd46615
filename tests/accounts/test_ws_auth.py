"""The WebSocket handshake: every forged, replayed, expired or foreign attempt is refused."""

import asyncio
import base64
import gc
import json
import threading
from datetime import timedelta
from urllib.parse import quote

import jwt
import pytest
import time_machine
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import AccessToken
from rest_framework_simplejwt.utils import get_md5_hash_password

from accounts import services
from accounts.middleware import TicketAuthMiddleware, chosen_subprotocol
from accounts.models import Ticket
from accounts.tokens import WebSocketTicket
from chat.models import ConnectionLog
from chat.runtime import get_runtime
from tests.conftest import ORIGIN
from tests.factories import make_room, make_ticket, make_user
from tests.ws import Communicator, closed_with, communicator, receive_until

pytestmark = pytest.mark.django_db(transaction=True)

LOBBY = "/ws/rooms/lobby/"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _payload(ticket: str) -> dict:
    return jwt.decode(ticket, options={"verify_signature": False})


def tampered(ticket: str) -> str:
    header, _, signature = ticket.split(".")
    return ".".join([header, _b64({**_payload(ticket), "room": "other"}), signature])


def alg_none(ticket: str) -> str:
    return ".".join([_b64({"alg": "none", "typ": "JWT"}), _b64(_payload(ticket)), ""])


def other_key(ticket: str) -> str:
    return jwt.encode(
        _payload(ticket), "another-signing-key-that-is-long-enough-0123", algorithm="HS256"
    )


@pytest.fixture
def alice():
    return make_user("alice")


@pytest.fixture
def lobby():
    return make_room("lobby")


@database_sync_to_async
def ticket_state(token: str) -> Ticket:
    return Ticket.objects.get(jti=_payload(token)["jti"])


async def audit_rows() -> list[ConnectionLog]:
    await get_runtime().audit.flush()
    return await database_sync_to_async(lambda: list(ConnectionLog.objects.order_by("opened_at")))()


async def refused_code(comm) -> int:
    connected, _ = await comm.connect()
    assert connected, "refusals after the Origin check are accept-then-close"
    code, reason = await closed_with(comm)
    assert reason == "authentication failed" or code != 4401
    await comm.disconnect()
    return code


# --- refused tickets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda t: "garbage", "ticket_invalid"),
        (lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"), "ticket_invalid"),
        (tampered, "ticket_invalid"),
        (alg_none, "ticket_invalid"),
        (other_key, "ticket_invalid"),
    ],
    ids=["garbage", "bad-signature", "tampered-payload", "alg-none", "other-key"],
)
async def test_forged_ticket_is_refused_4401(alice, lobby, forge, reason):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    assert await refused_code(communicator(LOBBY, ticket=forge(token))) == 4401
    [row] = await audit_rows()
    assert (row.outcome, row.reason, row.close_code) == ("rejected", reason, 4401)
    assert (await ticket_state(token)).used_at is None


async def test_expired_ticket_is_refused_and_not_consumed(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    later = timezone.now() + settings.CHAT_TICKET_LIFETIME + timedelta(seconds=1)
    with time_machine.travel(later, tick=True):
        assert await refused_code(communicator(LOBBY, ticket=token)) == 4401
    [row] = await audit_rows()
    assert row.reason == "ticket_expired"
    assert (await ticket_state(token)).used_at is None


async def test_ticket_is_valid_until_its_last_second(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    # The clock stands still a millisecond before the ticket's recorded expiry (a ticking clock
    # would leave the connect a race against a slow host).
    almost = (await ticket_state(token)).expires_at - timedelta(milliseconds=1)
    with time_machine.travel(almost, tick=False):
        comm = communicator(LOBBY, ticket=token)
        assert (await comm.connect())[0]
        assert (await receive_until(comm, "hello"))["user"] == "alice"
        await comm.disconnect()


async def test_reused_ticket_is_refused(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    first = communicator(LOBBY, ticket=token)
    assert (await first.connect())[0]
    await receive_until(first, "hello")
    assert await refused_code(communicator(LOBBY, ticket=token)) == 4401
    await first.disconnect()
    rows = await audit_rows()
    assert [(r.outcome, r.reason) for r in rows] == [
        ("accepted", ""),
        ("rejected", "ticket_reused"),
    ]


async def test_fifty_parallel_uses_accept_exactly_one(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comms = [communicator(LOBBY, ticket=token) for _ in range(50)]
    await asyncio.gather(*(c.connect() for c in comms))

    async def outcome(comm):
        frame = await comm.receive_output(timeout=5)
        return "hello" if frame["type"] == "websocket.send" else frame.get("code")

    outcomes = await asyncio.gather(*(outcome(c) for c in comms))
    assert outcomes.count("hello") == 1
    assert outcomes.count(4401) == 49
    await asyncio.gather(*(c.disconnect() for c in comms))
    reasons = [r.reason for r in await audit_rows() if r.outcome == "rejected"]
    assert reasons == ["ticket_reused"] * 49


def test_fifty_threads_redeeming_one_ticket_consume_it_once(alice, lobby):
    """The single-use guarantee is the database's conditional UPDATE, not the event loop."""
    token = make_ticket(alice, lobby)
    barrier = threading.Barrier(50)
    results = []

    def redeem():
        from django.db import connection

        barrier.wait()
        try:
            results.append(services.ticket_redeem(token=token, room_slug="lobby", ip="127.0.0.1"))
        finally:
            connection.close()

    threads = [threading.Thread(target=redeem) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for r in results if not r.error) == 1
    assert sorted({r.error for r in results if r.error}) == ["ticket_reused"]


async def test_ticket_for_another_room_is_refused_and_not_consumed(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    await database_sync_to_async(make_room)("other")
    assert await refused_code(communicator("/ws/rooms/other/", ticket=token)) == 4401
    [row] = await audit_rows()
    assert (row.reason, row.room_slug, row.jti) == (
        "room_mismatch",
        "other",
        _payload(token)["jti"],
    )
    assert (await ticket_state(token)).used_at is None


async def test_ticket_from_another_ip_is_refused_and_not_consumed(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby, ip="198.51.100.4")
    assert await refused_code(communicator(LOBBY, ticket=token, ip="203.0.113.50")) == 4401
    [row] = await audit_rows()
    assert (row.reason, row.ip) == ("ip_mismatch", "203.0.113.50")
    assert (await ticket_state(token)).used_at is None


async def test_ticket_of_deactivated_user_is_refused(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    alice.is_active = False
    await database_sync_to_async(alice.save)()
    assert await refused_code(communicator(LOBBY, ticket=token)) == 4401
    [row] = await audit_rows()
    assert row.reason == "user_inactive"
    assert (await ticket_state(token)).used_at is None


async def test_access_token_is_not_a_ticket(alice, lobby):
    access = await database_sync_to_async(lambda: str(AccessToken.for_user(alice)))()
    assert await refused_code(communicator(LOBBY, ticket=access)) == 4401
    [row] = await audit_rows()
    assert row.reason == "ticket_invalid"


async def test_revoked_ticket_is_refused(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    await database_sync_to_async(lambda: Ticket.objects.update(revoked_at=timezone.now()))()
    assert await refused_code(communicator(LOBBY, ticket=token)) == 4401
    assert (await audit_rows())[0].reason == "ticket_revoked"


# --- Origin ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        None,
        "null",
        "http://evil.example",
        "https://testserver",  # right host, wrong scheme
        "http://testserver:8080",  # right host, wrong port
        "http://testserver.evil.example",
        "http://testserver/path",
    ],
    ids=["missing", "null", "foreign", "scheme", "port", "suffix", "with-path"],
)
async def test_bad_origin_is_refused_with_http_403_before_the_ticket(alice, lobby, origin):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comm = communicator(LOBBY, ticket=token, origin=origin)
    connected, code = await comm.connect()
    assert (connected, code) == (False, 4403), "closing before accept is an HTTP 403 in daphne"
    [row] = await audit_rows()
    assert (row.outcome, row.reason) == ("rejected", "origin_denied")
    assert (await ticket_state(token)).used_at is None


async def test_second_origin_header_is_not_believed_and_the_first_is_recorded(alice, lobby):
    # A browser sends one Origin. Under daphne, autobahn joins repeated headers into one value
    # (which then matches no origin); an ASGI server that passes them on as they came must not
    # let the second win. The check and the audit row read the same (first) value.
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comm = communicator(
        LOBBY, ticket=token, headers=[(b"origin", b"http://evil.example")], origin=ORIGIN
    )
    assert await comm.connect() == (False, 4403)
    [row] = await audit_rows()
    assert (row.reason, row.origin) == ("origin_denied", "http://evil.example")
    assert (await ticket_state(token)).used_at is None


@pytest.mark.parametrize(
    "origin", ["http://testserver", "HTTP://TESTSERVER", "http://testserver:80"]
)
async def test_allowed_origin_in_any_spelling_is_accepted(alice, lobby, origin):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comm = communicator(LOBBY, ticket=token, origin=origin)
    assert (await comm.connect())[0]
    await receive_until(comm, "hello")
    await comm.disconnect()


# --- client IP behind proxies ---------------------------------------------------------------------


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(alice, lobby, settings):
    settings.CHAT_TRUSTED_PROXIES = ["127.0.0.1"]
    # The attacker holds a ticket bound to the victim's IP and claims to be that IP.
    token = await database_sync_to_async(make_ticket)(alice, lobby, ip="198.51.100.4")
    comm = communicator(
        LOBBY, ticket=token, ip="203.0.113.50", headers=[(b"x-forwarded-for", b"198.51.100.4")]
    )
    assert await refused_code(comm) == 4401
    [row] = await audit_rows()
    assert (row.reason, row.ip) == ("ip_mismatch", "203.0.113.50")


async def test_forwarded_for_from_trusted_proxy_is_the_client_ip(alice, lobby, settings):
    settings.CHAT_TRUSTED_PROXIES = ["127.0.0.1"]
    token = await database_sync_to_async(make_ticket)(alice, lobby, ip="198.51.100.4")
    comm = communicator(
        LOBBY,
        ticket=token,
        ip="127.0.0.1",
        headers=[(b"x-forwarded-for", b"6.6.6.6, 198.51.100.4")],
    )
    assert (await comm.connect())[0]
    await receive_until(comm, "hello")
    await comm.disconnect()
    assert (await audit_rows())[0].ip == "198.51.100.4"


# --- the three transports -------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["subprotocol", "query"])
async def test_transport_accepted_when_valid(alice, lobby, transport):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comm = communicator(LOBBY, ticket=token, transport=transport)
    connected, subprotocol = await comm.connect()
    assert connected
    assert subprotocol == "chat.v1"
    assert token not in str(subprotocol)
    hello = await receive_until(comm, "hello")
    assert (hello["user"], hello["room"]) == ("alice", "lobby")
    await comm.disconnect()
    row = (await audit_rows())[0]
    assert (row.outcome, row.transport, row.jti) == ("accepted", transport, _payload(token)["jti"])
    assert (await ticket_state(token)).used_at is not None


@pytest.mark.parametrize("transport", ["subprotocol", "query"])
async def test_no_scope_keeps_the_ticket_once_redeemed(alice, lobby, transport):
    seen = {}

    async def application(scope, receive, send):
        seen.update(scope)
        await receive()
        await send({"type": "websocket.accept", "subprotocol": chosen_subprotocol(scope)})

    token = await database_sync_to_async(make_ticket)(alice, lobby)
    path, protocols = LOBBY, ["chat.v1"]
    if transport == "subprotocol":
        protocols.append(f"ticket.{token}")
    else:
        path += f"?v=1&ticket={quote(token)}&empty="
    headers = [
        (b"origin", ORIGIN.encode()),
        # As daphne passes it: the offered subprotocols are in the headers too.
        (b"sec-websocket-protocol", ", ".join(protocols).encode()),
    ]
    comm = Communicator(
        TicketAuthMiddleware(application), path, headers=headers, subprotocols=protocols
    )
    comm.scope["client"] = ["127.0.0.1", 50000]
    assert await comm.connect() == (True, "chat.v1")
    await comm.disconnect()
    assert seen["user"] == alice  # redeemed first
    assert seen["ticket_transport"] == transport
    assert token not in repr(seen)
    # Nor in the scope the server built, which the applications above the middleware hold (the
    # router, the origin check) as long as the socket is open.
    assert token not in repr(comm.scope)
    assert seen["subprotocols"] == ["chat.v1"]
    assert (b"sec-websocket-protocol", b"chat.v1") in seen["headers"]
    assert seen["query_string"] == (b"v=1&empty=" if transport == "query" else b"")


async def test_first_frame_transport_accepted_when_valid(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comm = communicator(LOBBY, transport="first_frame", ticket=None)
    connected, subprotocol = await comm.connect()
    assert (connected, subprotocol) == (True, "chat.v1")
    await comm.send_json_to({"type": "auth", "ticket": token})
    assert (await receive_until(comm, "hello"))["user"] == "alice"
    await comm.disconnect()
    assert (await audit_rows())[0].transport == "first_frame"


async def test_no_subprotocol_offered_means_none_chosen(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comm = communicator(LOBBY, ticket=token, transport="query", subprotocols=[])
    connected, subprotocol = await comm.connect()
    assert (connected, subprotocol) == (True, None)
    await comm.disconnect()


async def test_no_ticket_in_first_frame_is_refused(alice, lobby):
    comm = communicator(LOBBY, transport="first_frame", ticket=None)
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "message", "body": "hi", "client_id": "x"})
    assert (await closed_with(comm))[0] == 4401
    await comm.disconnect()
    assert (await audit_rows())[0].reason == "ticket_missing"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("[" * 5000, "ticket_missing"),  # under the 8 KiB cap; json raises RecursionError
        ('{"type": "auth", "ticket": ' + "[" * 5000 + "}", "ticket_missing"),
        ('{"type": "auth", "ticket": "\\ud800"}', "ticket_invalid"),  # a lone surrogate
        ('{"type": "auth", "ticket": "t\u00e9st"}', "ticket_invalid"),
    ],
    ids=["nested", "nested-ticket", "lone-surrogate", "non-ascii"],
)
async def test_malformed_first_frame_is_refused_4401_and_audited(alice, lobby, frame, reason):
    row = await refused_first_frame(frame)
    assert (row.outcome, row.reason, row.close_code) == ("rejected", reason, 4401)


async def refused_first_frame(frame: str):
    """The audit row of a socket closed 4401 for the first frame it sent, `frame`."""
    comm = communicator(LOBBY, transport="first_frame", ticket=None)
    assert (await comm.connect())[0]
    await comm.send_to(text_data=frame)
    assert (await closed_with(comm))[0] == 4401
    await comm.disconnect()
    [row] = await audit_rows()
    return row


async def test_a_first_frame_over_8_kib_is_not_read_for_a_ticket(alice, lobby):
    """The first frame comes before anyone is authenticated: one over 8 KiB is refused unparsed
    (ticket_missing), a valid ticket in it included, which stays unused."""
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    row = await refused_first_frame(
        json.dumps({"type": "auth", "ticket": token, "padding": "x" * 8192})
    )
    assert (row.outcome, row.reason) == ("rejected", "ticket_missing")
    assert (await ticket_state(token)).used_at is None


async def test_no_ticket_within_the_time_limit_closes_4408(alice, lobby, settings):
    settings.CHAT_AUTH_TIMEOUT = 0.2
    comm = communicator(LOBBY, transport="first_frame", ticket=None)
    assert (await comm.connect())[0]
    assert (await closed_with(comm))[0] == 4408
    await comm.disconnect()
    assert (await audit_rows())[0].reason == "auth_timeout"


async def test_unknown_path_is_refused(alice, lobby):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    assert await refused_code(communicator("/ws/elsewhere/", ticket=token)) == 4401
    assert (await ticket_state(token)).used_at is None


# --- shared state (Redis) down ------------------------------------------------------------------


@pytest.fixture
def state_down(monkeypatch):
    """Every call on the shared state fails, as with Redis unreachable."""
    from chat.state import MemoryState, RedisState, StateUnavailable

    async def unavailable(self, *args, **kwargs):
        raise StateUnavailable("redis is down")

    for cls in (MemoryState, RedisState):
        for name in ("take_token", "count_hit", "throttle", "socket_open"):
            monkeypatch.setattr(cls, name, unavailable)


@pytest.mark.parametrize(
    ("origin", "connected", "code", "reason"),
    [
        pytest.param("http://testserver", True, 1013, "unavailable", id="allowed-origin"),
        pytest.param("http://evil.example", False, 4403, "origin_denied", id="foreign-origin"),
    ],
)
async def test_with_redis_down_a_handshake_gets_its_close_code_not_a_500(
    alice, lobby, state_down, origin, connected, code, reason
):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comm = communicator(LOBBY, ticket=token, origin=origin)
    result = await comm.connect()
    if connected:
        assert result[0]
        assert (await closed_with(comm))[0] == code
    else:
        assert result == (False, code)
    await comm.disconnect()
    [row] = await audit_rows()
    assert (row.outcome, row.reason) == ("rejected", reason)


@pytest.mark.parametrize("transport", ["subprotocol", "first_frame"])
async def test_a_database_failure_while_redeeming_is_recorded_and_retried_later(
    alice, lobby, monkeypatch, caplog, transport
):
    """The error escaped the middleware: no close code for the client, and no audit row for an
    attempt whose ticket the failed call may already have used (found by review)."""
    from django.db import OperationalError

    def failing(**kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "ticket_redeem", failing)
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    if transport == "first_frame":
        comm = communicator(LOBBY)
        assert (await comm.connect())[0]
        await comm.send_to(text_data=json.dumps({"type": "auth", "ticket": token}))
    else:
        comm = communicator(LOBBY, ticket=token)
        assert (await comm.connect())[0]
    assert (await closed_with(comm))[0] == 1013
    await comm.disconnect()
    [row] = await audit_rows()
    assert (row.outcome, row.reason, row.close_code) == ("rejected", "unavailable", 1013)
    assert token not in caplog.text
    assert "ticket redemption failed: OperationalError" in caplog.text


@pytest.mark.parametrize("transport", ["subprotocol", "query", "first_frame"])
async def test_an_open_socket_does_not_keep_the_ticket_row(alice, lobby, transport):
    token = await database_sync_to_async(make_ticket)(alice, lobby)
    comm = communicator(
        LOBBY, transport=transport, ticket=None if transport == "first_frame" else token
    )
    assert (await comm.connect())[0]
    if transport == "first_frame":
        await comm.send_json_to({"type": "auth", "ticket": token})
    await receive_until(comm, "hello")
    gc.collect()
    # type(), not isinstance(): gc.get_objects() also returns dead weak proxies.
    assert not [o for o in gc.get_objects() if type(o) is Ticket]
    await comm.disconnect()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"used_at": "now"}, "ticket_reused"),
        ({"revoked_at": "now"}, "ticket_revoked"),
        # The row's expiry, checked by the database even while the signed token still holds.
        ({"expires_at": "past"}, "ticket_expired"),
    ],
    ids=["issued", "used", "revoked", "expired_row"],
)
def test_redemption_claims_exactly_the_tickets_the_queryset_calls_usable(
    alice, lobby, change, reason
):
    token = make_ticket(alice, lobby)
    now = timezone.now()
    values = {"now": now, "past": now - timedelta(seconds=1)}
    ticket = Ticket.objects.get()
    Ticket.objects.filter(pk=ticket.pk).update(**{k: values[v] for k, v in change.items()})
    was_usable = Ticket.objects.usable().filter(pk=ticket.pk).exists()
    result = services.ticket_redeem(token=token, room_slug="lobby", ip="127.0.0.1")
    assert was_usable is (reason is None)
    assert result.error == (reason or "")
    assert (result.user == alice) is (reason is None)
    ticket.refresh_from_db()
    assert (ticket.used_ip == "127.0.0.1") is (reason is None)  # only a claim writes it


def resigned(token: str, **claims) -> str:
    """`token` with `claims` changed and signed again with the server's own key (what someone
    holding the signing key could present). Its jti still names the original's row."""
    ticket = WebSocketTicket(token)
    for name, value in claims.items():
        ticket[name] = value
    return str(ticket)


@pytest.mark.parametrize("claim", ["user", "room"])
def test_a_re_signed_ticket_does_not_redeem_its_row_for_another_user_or_room(alice, lobby, claim):
    """The signature is not all that binds a ticket: its row says whom and which room it was
    issued for. A valid signature over another user (with that user's password claim) or another
    room must not redeem alice's row for them."""
    bob, other = make_user("bob"), make_room("other")
    token = make_ticket(alice, lobby)
    if claim == "user":
        changes = {
            jwt_settings.USER_ID_CLAIM: str(bob.pk),
            jwt_settings.REVOKE_TOKEN_CLAIM: get_md5_hash_password(bob.password),
        }
    else:
        changes = {"room": other.slug}
    forged = resigned(token, **changes)
    room_slug = other.slug if claim == "room" else lobby.slug
    result = services.ticket_redeem(token=forged, room_slug=room_slug, ip="127.0.0.1")
    assert (result.error, result.user, result.grant) == ("ticket_invalid", None, None)
    assert Ticket.objects.get().used_at is None
