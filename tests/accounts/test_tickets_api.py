import zoneinfo
from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.http import QueryDict
from django.utils import timezone as django_timezone
from rest_framework.exceptions import ValidationError
from rest_framework.test import APIClient

from accounts.models import Ticket
from accounts.serializers import TicketRequestSerializer, TicketSerializer
from accounts.tokens import WebSocketTicket
from chat.models import Room, SecurityEvent
from tests.factories import PASSWORD, make_member, make_room, make_user

pytestmark = pytest.mark.django_db


def bearer_client(user) -> APIClient:
    api = APIClient()
    tokens = api.post(
        "/api/auth/token/", {"username": user.username, "password": PASSWORD}, format="json"
    )
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens.json()['access']}")
    return api


def test_ticket_issued_with_bearer_token():
    alice = make_user("alice")
    make_room("lobby")
    response = bearer_client(alice).post("/api/tickets/", {"room": "lobby"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["ws_url"] == "/ws/rooms/lobby/"
    assert response["Cache-Control"] == "no-store"
    claims = WebSocketTicket(body["ticket"])
    row = Ticket.objects.get()
    assert claims["jti"] == row.jti
    assert claims["room"] == "lobby"
    assert claims["ip"] == row.ip == "127.0.0.1"
    assert claims["user_id"] == str(alice.pk)
    assert row.used_at is None
    assert (row.expires_at - row.issued_at).total_seconds() == pytest.approx(30, abs=1)
    assert row.credential.startswith("jwt:")
    # The answer is the documented one (the OpenAPI schema's TicketSerializer).
    assert (
        body
        == TicketSerializer(
            {"ticket": body["ticket"], "expires_at": row.expires_at, "ws_url": "/ws/rooms/lobby/"}
        ).data
    )


@pytest.mark.parametrize(
    "expires_at",
    [
        datetime(2026, 12, 6, 16, 0, 30, 123456, tzinfo=UTC),
        datetime(2026, 12, 6, 16, 0, 30, tzinfo=UTC),
        datetime(2026, 12, 6, 17, 0, 30, 5, tzinfo=timezone(timedelta(hours=1))),
    ],
)
@pytest.mark.parametrize("datetime_format", ["default", "%Y-%m-%d %H:%M:%S", None])
@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris"])
def test_ticket_body_is_what_the_ticket_serializer_gives(
    expires_at, datetime_format, zone, settings
):
    """The ticket view builds its answer without a serializer instance; it must stay the one
    TicketSerializer documents, DRF's datetime format and the current time zone included."""
    if datetime_format != "default":
        settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DATETIME_FORMAT": datetime_format}
    values = {"ticket": "a.b.c", "expires_at": expires_at, "ws_url": "/ws/rooms/lobby/"}
    with django_timezone.override(zoneinfo.ZoneInfo(zone)):
        body = TicketSerializer.body(**values)
        assert body == TicketSerializer(values).data
    local = expires_at.astimezone(zoneinfo.ZoneInfo(zone))
    shown = {
        "default": local.isoformat().replace("+00:00", "Z"),
        None: expires_at,
    }.get(datetime_format) or local.strftime(datetime_format)
    assert body["expires_at"] == shown


@pytest.mark.parametrize("member", [True, False])
def test_a_bearer_ticket_request_takes_three_statements(member, django_assert_num_queries):
    """The token's user with its login's end, the room with the membership, the INSERT: on
    PostgreSQL each statement is a round trip, on every handshake."""
    alice = make_user("alice")
    room = make_room("lobby")
    if member:
        make_member(room, alice)
    api = bearer_client(alice)
    with django_assert_num_queries(3):
        response = api.post("/api/tickets/", {"room": "lobby"}, format="json")
    assert response.status_code == 201
    assert Ticket.objects.get().room_id == room.pk


def test_the_ticket_itself_is_never_stored():
    alice = make_user("alice")
    make_room("lobby")
    token = (
        bearer_client(alice)
        .post("/api/tickets/", {"room": "lobby"}, format="json")
        .json()["ticket"]
    )
    row = Ticket.objects.get()
    assert all(token not in str(getattr(row, f.attname)) for f in Ticket._meta.concrete_fields)


def test_ticket_with_session_requires_csrf():
    alice = make_user("alice")
    make_room("lobby")
    api = APIClient(enforce_csrf_checks=True)
    api.get("/login/")  # the sign-in form sets the csrftoken cookie
    token = api.cookies["csrftoken"].value
    api.force_login(alice)
    assert api.post("/api/tickets/", {"room": "lobby"}, format="json").status_code == 403
    response = api.post("/api/tickets/", {"room": "lobby"}, format="json", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 201
    assert Ticket.objects.get().credential.startswith("session:")


def test_unauthenticated_is_401_with_challenge():
    make_room("lobby")
    response = APIClient().post("/api/tickets/", {"room": "lobby"}, format="json")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("state", ["unknown", "archived"])
def test_unknown_or_archived_room_is_404(state):
    from django.utils import timezone

    alice = make_user("alice")
    if state == "archived":
        make_room("lobby", archived_at=timezone.now())
    response = bearer_client(alice).post("/api/tickets/", {"room": "lobby"}, format="json")
    assert response.status_code == 404
    assert not Ticket.objects.exists()


@pytest.mark.parametrize("case", ["private_non_member", "banned_public"])
def test_no_access_is_403_and_audited(case):
    from django.utils import timezone

    alice = make_user("alice")
    if case == "private_non_member":
        make_room("lobby", visibility=Room.Visibility.PRIVATE)
    else:
        room = make_room("lobby")
        make_member(room, alice, banned_at=timezone.now())
    response = bearer_client(alice).post("/api/tickets/", {"room": "lobby"}, format="json")
    assert response.status_code == 403
    assert not Ticket.objects.exists()
    refused = SecurityEvent.objects.get(event=SecurityEvent.Event.TICKET_REFUSED)
    assert refused.actor_id == alice.pk
    assert refused.room_slug == "lobby"


def test_private_room_member_gets_ticket():
    alice = make_user("alice")
    room = make_room("lobby", visibility=Room.Visibility.PRIVATE)
    make_member(room, alice)
    assert (
        bearer_client(alice).post("/api/tickets/", {"room": "lobby"}, format="json").status_code
        == 201
    )


def test_tickets_are_throttled(monkeypatch):
    from accounts.throttling import TicketThrottle

    monkeypatch.setattr(
        TicketThrottle, "THROTTLE_RATES", {**TicketThrottle.THROTTLE_RATES, "tickets": "2/min"}
    )
    alice = make_user("alice")
    make_room("lobby")
    api = bearer_client(alice)
    codes = [
        api.post("/api/tickets/", {"room": "lobby"}, format="json").status_code for _ in range(3)
    ]
    assert codes == [201, 201, 429]


def test_ticket_ip_ignores_spoofed_forwarded_for_from_untrusted_peer(settings):
    settings.CHAT_TRUSTED_PROXIES = ["127.0.0.1"]
    alice = make_user("alice")
    make_room("lobby")
    api = bearer_client(alice)
    api.post(
        "/api/tickets/",
        {"room": "lobby"},
        format="json",
        REMOTE_ADDR="203.0.113.9",
        HTTP_X_FORWARDED_FOR="1.2.3.4",
    )
    api.post(
        "/api/tickets/",
        {"room": "lobby"},
        format="json",
        REMOTE_ADDR="127.0.0.1",
        HTTP_X_FORWARDED_FOR="1.2.3.4, 198.51.100.7",
    )
    assert list(Ticket.objects.order_by("issued_at").values_list("ip", flat=True)) == [
        "203.0.113.9",
        "198.51.100.7",
    ]


def test_inactive_user_gets_no_ticket_from_the_service():
    from accounts.services import TicketRefused, ticket_issue

    alice = make_user("alice", is_active=False)
    room = make_room("lobby")
    with pytest.raises(TicketRefused):
        ticket_issue(user=alice, room=room, ip="127.0.0.1")
    assert not Ticket.objects.exists()


def test_invalid_body_is_400():
    alice = make_user("alice")
    response = bearer_client(alice).post("/api/tickets/", {"nope": 1}, format="json")
    assert response.status_code == 400


def _validated_room(data):
    """What TicketRequestSerializer makes of `data`: the room, or its error's detail."""
    serializer = TicketRequestSerializer(data=data)
    if serializer.is_valid():
        return serializer.validated_data["room"]
    return serializer.errors


@pytest.mark.parametrize(
    "data",
    [
        {"room": "lobby"},
        {"room": "  lobby\n"},
        {"room": "a" * 50},
        {"room": "lobby", "other": 1},
        QueryDict("room=lobby"),
        {"room": "a" * 51},
        {"room": " " + "a" * 50},
        {"room": ""},
        {"room": "   "},
        {"room": "lob\x00by"},
        {"room": "\ud800"},
        {"room": "café"},
        {"room": "a\tb"},
        {"room": 5},
        {"room": None},
        {"room": ["lobby"]},
        {},
        QueryDict(""),
        ["lobby"],
        "lobby",
        None,
    ],
)
def test_the_ticket_request_room_is_what_the_serializer_validates(data):
    """The ticket view takes a plain slug without a serializer instance: every input must give
    the serializer's answer, the room or the same error."""
    expected = _validated_room(data)
    if isinstance(expected, str):
        assert TicketRequestSerializer.room_of(data) == expected
    else:
        with pytest.raises(ValidationError) as raised:
            TicketRequestSerializer.room_of(data)
        assert raised.value.detail == expected


def test_a_plain_slug_is_taken_without_a_serializer(monkeypatch):
    """The point of room_of: no serializer (and no deep copy of its fields) per ticket request;
    and nothing the fast path would skip (a room or object validator) exists."""
    assert "validate_room" not in vars(TicketRequestSerializer)
    assert "validate" not in vars(TicketRequestSerializer)

    def made(*args, **kwargs):
        raise AssertionError("a serializer was made")

    monkeypatch.setattr(TicketRequestSerializer, "__init__", made)
    assert TicketRequestSerializer.room_of({"room": " lobby "}) == "lobby"
    with pytest.raises(AssertionError, match="a serializer was made"):
        TicketRequestSerializer.room_of({"room": ""})
