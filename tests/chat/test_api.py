"""The rooms REST API: same services and policy as the sockets."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from chat import broadcast, services
from chat.models import Membership, Message, Room, SecurityEvent
from tests.factories import make_member, make_room, make_user

pytestmark = pytest.mark.django_db


def client_for(user) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


@pytest.fixture
def alice():
    return make_user("alice")


def test_create_room_makes_the_creator_owner_and_audits(alice):
    response = client_for(alice).post(
        "/api/rooms/",
        {"slug": "dev-team", "title": "Dev team", "visibility": "private"},
        format="json",
    )
    assert response.status_code == 201
    assert response.json()["role"] == "owner"
    room = Room.objects.get(slug="dev-team")
    assert Membership.objects.get(room=room, user=alice).role == "owner"
    assert SecurityEvent.objects.filter(event="room_created", room_slug="dev-team").exists()


@pytest.mark.parametrize("slug", ["Has Caps", "-dash", "dash-", "x" * 51, "ü", "a/b", ""])
def test_room_slugs_are_validated(alice, slug):
    response = client_for(alice).post("/api/rooms/", {"slug": slug, "title": "t"}, format="json")
    assert response.status_code == 400


def test_duplicate_slug_is_409(alice):
    make_room("lobby")
    response = client_for(alice).post("/api/rooms/", {"slug": "lobby", "title": "t"}, format="json")
    assert response.status_code == 409


def test_room_list_shows_visible_rooms_with_role_and_unread(alice):
    bob = make_user("bob")
    lobby = make_room("lobby", owner=bob)
    make_room("secret", visibility=Room.Visibility.PRIVATE, owner=bob)
    mine = make_room("mine", visibility=Room.Visibility.PRIVATE, owner=alice)
    banned = make_room("banned-here")
    make_member(banned, alice, banned_at=timezone.now())
    make_room("gone", archived_at=timezone.now())
    for i in range(3):
        services.message_send(room=lobby, author=bob, body=f"m{i}", client_id=f"m{i}")
    make_member(lobby, alice)
    services.room_mark_read(user=alice, room=Room.objects.get(pk=lobby.pk), seq=1)
    rooms = {r["slug"]: r for r in client_for(alice).get("/api/rooms/").json()}
    assert set(rooms) == {"lobby", "mine"}
    assert (rooms["lobby"]["role"], rooms["lobby"]["unread"]) == ("member", 2)
    assert (rooms["mine"]["role"], rooms["mine"]["unread"]) == ("owner", 0)
    assert mine.slug in rooms


def test_staff_see_every_active_room(alice):
    admin = make_user("root", is_staff=True)
    make_room("secret", visibility=Room.Visibility.PRIVATE, owner=alice)
    assert [r["slug"] for r in client_for(admin).get("/api/rooms/").json()] == ["secret"]


def test_owner_updates_title_and_visibility_and_others_cannot(alice):
    bob = make_user("bob")
    room = make_room("lobby", owner=alice)
    make_member(room, bob, "moderator")
    refused = client_for(bob).patch("/api/rooms/lobby/", {"title": "Mine now"}, format="json")
    assert refused.status_code == 403
    response = client_for(alice).patch(
        "/api/rooms/lobby/", {"title": "Hall", "visibility": "read_only"}, format="json"
    )
    assert response.status_code == 200
    assert (response.json()["title"], response.json()["visibility"]) == ("Hall", "read_only")
    event = SecurityEvent.objects.get(event="room_updated")
    assert event.details == {"title": ["Lobby", "Hall"], "visibility": ["public", "read_only"]}


def test_archive_hides_the_room(alice):
    make_room("lobby", owner=alice)
    assert client_for(alice).post("/api/rooms/lobby/archive/", {}, format="json").status_code == 200
    assert client_for(alice).get("/api/rooms/lobby/").status_code == 404
    assert client_for(alice).get("/api/rooms/").json() == []


def test_join_public_room_but_not_private_or_banned(alice):
    bob = make_user("bob")
    make_room("open", owner=bob)
    make_room("closed", visibility=Room.Visibility.PRIVATE, owner=bob)
    banned = make_room("banned-here", owner=bob)
    make_member(banned, alice, banned_at=timezone.now())
    api = client_for(alice)
    assert api.post("/api/rooms/open/join/").status_code == 200
    assert api.post("/api/rooms/open/join/").status_code == 200  # idempotent
    assert api.post("/api/rooms/closed/join/").status_code == 403
    assert api.post("/api/rooms/banned-here/join/").status_code == 403
    assert Membership.objects.filter(user=alice, banned_at__isnull=True).count() == 1


def test_messages_page_by_cursor(alice):
    room = make_room("lobby", owner=alice)
    for i in range(1, 8):
        services.message_send(room=room, author=alice, body=f"m{i}", client_id=f"c{i}")
    api = client_for(alice)
    newest = api.get("/api/rooms/lobby/messages/?limit=3").json()
    assert ([m["seq"] for m in newest["messages"]], newest["has_more"]) == ([5, 6, 7], True)
    before = api.get("/api/rooms/lobby/messages/?before=5&limit=3").json()
    assert [m["seq"] for m in before["messages"]] == [2, 3, 4]
    after = api.get("/api/rooms/lobby/messages/?after=5").json()
    assert ([m["seq"] for m in after["messages"]], after["has_more"]) == ([6, 7], False)
    assert api.get("/api/rooms/lobby/messages/?after=1&before=3").status_code == 400
    assert api.get("/api/rooms/lobby/messages/?limit=101").status_code == 400
    assert api.get("/api/rooms/lobby/messages/?after=-1").status_code == 400


def test_post_message_is_idempotent_by_client_id(alice):
    make_room("lobby", owner=alice)
    api = client_for(alice)
    first = api.post("/api/rooms/lobby/messages/", {"body": "hi", "client_id": "k1"}, format="json")
    again = api.post("/api/rooms/lobby/messages/", {"body": "hi", "client_id": "k1"}, format="json")
    assert (first.status_code, first.json()["duplicate"]) == (201, False)
    assert (again.status_code, again.json()) == (
        200,
        {"seq": 1, "client_id": "k1", "duplicate": True},
    )
    assert Message.objects.count() == 1


def test_post_message_validation(alice):
    make_room("lobby", owner=alice)
    api = client_for(alice)
    too_long = api.post(
        "/api/rooms/lobby/messages/", {"body": "x" * 4001, "client_id": "k"}, format="json"
    )
    assert (too_long.status_code, too_long.json()["code"]) == (400, "too_long")
    # Counted as stored: a CRLF is one line break, so 4,000 characters with it fit.
    crlf = api.post(
        "/api/rooms/lobby/messages/", {"body": "x" * 3999 + "\r\n", "client_id": "k"}, format="json"
    )
    assert crlf.status_code == 201
    assert Message.objects.get(client_id="k").body == "x" * 3999 + "\n"
    bad_id = api.post(
        "/api/rooms/lobby/messages/", {"body": "x", "client_id": "no spaces"}, format="json"
    )
    assert bad_id.status_code == 400


@pytest.fixture
def broadcasts(monkeypatch):
    """Every event the services publish to the rooms' sockets, as (group, event)."""
    published = []
    monkeypatch.setattr(broadcast, "publish", lambda group, event: published.append((group, event)))
    return published


def test_post_message_with_a_string_body_is_stored_and_broadcast(alice, broadcasts):
    make_room("lobby", owner=alice)
    response = client_for(alice).post(
        "/api/rooms/lobby/messages/", {"body": "5", "client_id": "k"}, format="json"
    )
    assert response.status_code == 201
    assert Message.objects.get(client_id="k").body == "5"
    assert [event["type"] for _, event in broadcasts] == ["hub.messages"]


@pytest.mark.parametrize("field", ["body", "client_id"])
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (5, ("invalid", "Not a valid string.")),
        (1.5, ("invalid", "Not a valid string.")),
        (True, ("invalid", "Not a valid string.")),
        (["hi"], ("invalid", "Not a valid string.")),
        ({"text": "hi"}, ("invalid", "Not a valid string.")),
        (None, ("null", "This field may not be null.")),
    ],
    ids=["int", "float", "bool", "list", "object", "null"],
)
def test_post_message_refuses_a_field_that_is_not_a_string(alice, broadcasts, field, value, error):
    """As the socket refuses such a frame: DRF's CharField read 5 as "5" and stored it."""
    make_room("lobby", owner=alice)
    data = {"body": "hi", "client_id": "k", field: value}
    response = client_for(alice).post("/api/rooms/lobby/messages/", data, format="json")
    code, text = error
    assert (response.status_code, response.json()) == (
        400,
        {"detail": f"{field}: {text}", "code": code, "errors": {field: [text]}},
    )
    assert not Message.objects.exists()
    assert broadcasts == []


@pytest.mark.parametrize(
    ("method", "path", "data", "field"),
    [
        ("post", "/api/rooms/", {"slug": 5, "title": "t"}, "slug"),
        ("post", "/api/rooms/", {"slug": "new-room", "title": 5}, "title"),
        ("patch", "/api/rooms/lobby/", {"title": 5}, "title"),
        ("post", "/api/rooms/lobby/archive/", {"reason": 5}, "reason"),
        ("post", "/api/rooms/lobby/members/", {"username": 5}, "username"),
        ("patch", "/api/rooms/lobby/members/bob/", {"banned": True, "reason": 5}, "reason"),
        ("post", "/api/tickets/", {"room": 5}, "room"),
        ("post", "/api/auth/logout/", {"refresh": 5}, "refresh"),
    ],
    ids=[
        "room slug",
        "room title",
        "new title",
        "archive reason",
        "member to add",
        "ban reason",
        "ticket room",
        "refresh token",
    ],
)
def test_every_text_field_refuses_a_number(alice, method, path, data, field):
    """DRF's CharField reads 5 as "5": a room titled "5", a ticket for a room named "5". Each
    free-text field of the API takes a JSON string only, and changes nothing otherwise."""
    room = make_room("lobby", owner=alice)
    make_member(room, make_user("bob"))
    rooms, audit_rows = Room.objects.count(), SecurityEvent.objects.count()
    response = getattr(client_for(alice), method)(path, data, format="json")
    assert response.status_code == 400
    assert response.json()["errors"] == {field: ["Not a valid string."]}
    assert Room.objects.count() == rooms
    assert Room.objects.get(slug="lobby").title == room.title
    assert room.memberships.get(user__username="bob").banned_at is None
    assert SecurityEvent.objects.count() == audit_rows


def test_deleted_message_is_a_tombstone_in_the_api(alice):
    room = make_room("lobby", owner=alice)
    services.message_send(room=room, author=alice, body="secret", client_id="k")
    assert client_for(alice).delete("/api/rooms/lobby/messages/1/").status_code == 204
    [message] = client_for(alice).get("/api/rooms/lobby/messages/").json()["messages"]
    assert message == {
        "seq": 1,
        "room": "lobby",
        "author": "alice",
        "created_at": message["created_at"],
        "deleted": True,
    }


def test_members_add_list_update_and_remove(alice):
    bob, carol = make_user("bob"), make_user("carol")
    make_room("team", visibility=Room.Visibility.PRIVATE, owner=alice)
    api = client_for(alice)
    assert (
        api.post("/api/rooms/team/members/", {"username": "bob"}, format="json").status_code == 201
    )
    assert (
        api.post("/api/rooms/team/members/", {"username": "bob"}, format="json").status_code == 409
    )
    assert (
        api.post("/api/rooms/team/members/", {"username": "nobody"}, format="json").status_code
        == 404
    )
    members = {m["username"]: m["role"] for m in api.get("/api/rooms/team/members/").json()}
    assert members == {"alice": "owner", "bob": "member"}
    assert (
        api.patch("/api/rooms/team/members/bob/", {"role": "moderator"}, format="json").json()[
            "role"
        ]
        == "moderator"
    )
    # A moderator may add members but not moderators, and may not touch the owner.
    as_bob = client_for(bob)
    assert (
        as_bob.post("/api/rooms/team/members/", {"username": "carol"}, format="json").status_code
        == 201
    )
    # Someone not in the room yet: refused for the role, not as a member already (409).
    dave = make_user("dave")
    refused = as_bob.post(
        "/api/rooms/team/members/", {"username": "dave", "role": "moderator"}, format="json"
    )
    assert refused.status_code == 403, refused.json()
    assert refused.json()["detail"] == "you may not add members with this role"
    assert not Membership.objects.filter(user=dave).exists()
    assert as_bob.delete("/api/rooms/team/members/alice/").status_code == 403
    until = (timezone.now() + timedelta(hours=1)).isoformat()
    muted = as_bob.patch("/api/rooms/team/members/carol/", {"muted_until": until}, format="json")
    assert muted.status_code == 200
    assert muted.json()["muted_until"]
    banned = api.patch(
        "/api/rooms/team/members/carol/", {"banned": True, "reason": "spam"}, format="json"
    )
    assert banned.json()["banned"] is True
    assert Membership.objects.get(user=carol).ban_reason == "spam"
    assert api.delete("/api/rooms/team/members/bob/").status_code == 204
    assert not Membership.objects.filter(user=bob).exists()
    events = list(SecurityEvent.objects.order_by("chain_seq").values_list("event", flat=True))
    assert events == [
        "member_added",
        "role_changed",
        "member_added",
        "member_muted",
        "member_banned",
        "member_removed",
    ]


def test_member_may_leave_but_owner_may_not(alice):
    bob = make_user("bob")
    room = make_room("lobby", owner=alice)
    make_member(room, bob)
    assert client_for(bob).delete("/api/rooms/lobby/members/bob/").status_code == 204
    assert client_for(alice).delete("/api/rooms/lobby/members/alice/").status_code == 403


def test_patch_member_needs_a_change(alice):
    bob = make_user("bob")
    room = make_room("lobby", owner=alice)
    make_member(room, bob)
    assert (
        client_for(alice).patch("/api/rooms/lobby/members/bob/", {}, format="json").status_code
        == 400
    )


def test_mark_read_updates_unread(alice):
    room = make_room("lobby", owner=alice)
    for i in range(4):
        services.message_send(room=room, author=alice, body="x", client_id=f"r{i}")
    api = client_for(alice)
    assert api.post("/api/rooms/lobby/read/", {"seq": 3}, format="json").status_code == 204
    assert api.get("/api/rooms/").json()[0]["unread"] == 1
    api.post("/api/rooms/lobby/read/", {"seq": 1}, format="json")  # never moves backwards
    assert api.get("/api/rooms/").json()[0]["unread"] == 1


def test_unauthenticated_requests_are_401():
    make_room("lobby")
    for method, path in [
        ("get", "/api/rooms/"),
        ("get", "/api/rooms/lobby/messages/"),
        ("post", "/api/rooms/"),
    ]:
        assert getattr(APIClient(), method)(path).status_code == 401


def test_openapi_schema_and_docs_are_served(alice):
    api = client_for(alice)
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in [
        "/api/tickets/",
        "/api/rooms/",
        "/api/rooms/{slug}/messages/",
        "/api/rooms/{slug}/members/{username}/",
        "/api/auth/token/",
    ]:
        assert path in paths
    assert api.get("/api/docs/").status_code == 200


def test_members_see_no_moderation_data_but_moderators_do(alice):
    bob, carol, dave = make_user("bob"), make_user("carol"), make_user("dave")
    room = make_room("lobby", owner=alice)
    make_member(room, bob)
    make_member(room, carol, muted_until=timezone.now() + timedelta(hours=1))
    make_member(room, dave, banned_at=timezone.now(), ban_reason="spam")
    as_member = client_for(bob).get("/api/rooms/lobby/members/").json()
    assert [m["username"] for m in as_member] == ["alice", "bob", "carol"]
    assert all(set(m) == {"username", "role", "joined_at"} for m in as_member)
    as_owner = {m["username"]: m for m in client_for(alice).get("/api/rooms/lobby/members/").json()}
    assert as_owner["dave"]["ban_reason"] == "spam"
    assert as_owner["carol"]["muted_until"]


def test_a_ban_may_have_no_reason(alice):
    bob = make_user("bob")
    room = make_room("lobby", owner=alice)
    make_member(room, bob)
    response = client_for(alice).patch(
        "/api/rooms/lobby/members/bob/", {"banned": True, "reason": ""}, format="json"
    )
    assert response.status_code == 200


def test_visitors_get_no_unread_count(alice):
    bob = make_user("bob")
    room = make_room("lobby", owner=bob)
    services.message_send(room=room, author=bob, body="x", client_id="v1")
    [row] = client_for(alice).get("/api/rooms/").json()
    assert row["unread"] is None


def test_mark_read_reads_the_room_fresh(alice):
    room = make_room("lobby", owner=alice)
    stale = Room.objects.get(pk=room.pk)  # last_seq 0 here
    for i in range(3):
        services.message_send(room=room, author=alice, body="x", client_id=f"s{i}")
    services.room_mark_read(user=alice, room=stale, seq=2)
    assert Membership.objects.get(user=alice).last_read_seq == 2
    services.room_mark_read(user=alice, room=stale, seq=99)
    assert Membership.objects.get(user=alice).last_read_seq == 3


@pytest.fixture
def rates(monkeypatch):
    """Set throttle rates by scope (DRF reads them when its throttle classes are made)."""
    from accounts import throttling

    def set_rates(**rates):
        for cls in (
            throttling.ApiThrottle,
            throttling.MessagePostThrottle,
            throttling.RoomCreateThrottle,
        ):
            monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, **rates})

    return set_rates


def test_messages_posted_through_the_api_are_limited_per_user(alice, rates):
    """The API was a way around the sockets' message limit: every post is stored and sent to
    the whole room. A refused post stores nothing; reading the room is not limited by it."""
    rates(rest_messages="3/min")
    bob = make_user("bob")
    room = make_room("lobby", owner=alice)
    make_member(room, bob)
    api = client_for(alice)
    posts = [
        api.post(
            "/api/rooms/lobby/messages/", {"body": f"m{i}", "client_id": f"k{i}"}, format="json"
        )
        for i in range(4)
    ]
    assert [p.status_code for p in posts] == [201, 201, 201, 429]
    assert posts[-1].json()["code"] == "throttled"
    assert int(posts[-1]["Retry-After"]) > 0
    assert Message.objects.count() == 3
    assert api.get("/api/rooms/lobby/messages/").status_code == 200
    # Per user: bob's posts are his own.
    bob_post = client_for(bob).post(
        "/api/rooms/lobby/messages/", {"body": "hi", "client_id": "b1"}, format="json"
    )
    assert bob_post.status_code == 201


def test_rooms_created_are_limited_per_user(alice, rates):
    """Public rooms are in everyone's list: one account must not grow it without bound."""
    rates(room_create="2/hour")
    api = client_for(alice)
    created = [
        api.post("/api/rooms/", {"slug": f"r{i}", "title": f"R{i}"}, format="json")
        for i in range(3)
    ]
    assert [c.status_code for c in created] == [201, 201, 429]
    assert int(created[-1]["Retry-After"]) > 0
    assert Room.objects.count() == 2
    assert api.get("/api/rooms/").status_code == 200  # listing is not creating
    other = client_for(make_user("bob")).post("/api/rooms/", {"slug": "b", "title": "B"})
    assert other.status_code == 201


def test_a_room_refused_by_the_general_limit_does_not_spend_the_room_budget(alice, rates):
    """DRF asks every throttle even once one has refused, and each records the request."""
    rates(api="1/min", room_create="2/hour")
    api = client_for(alice)
    assert api.post("/api/rooms/", {"slug": "r1", "title": "R1"}).status_code == 201
    assert api.post("/api/rooms/", {"slug": "r2", "title": "R2"}).status_code == 429  # api
    rates(api="100/min")  # (not the clock: with Redis the windows keep Redis's)
    assert api.post("/api/rooms/", {"slug": "r3", "title": "R3"}).status_code == 201
    assert api.post("/api/rooms/", {"slug": "r4", "title": "R4"}).status_code == 429  # rooms


@pytest.mark.parametrize(
    ("who", "request_line"),
    [
        ("user", ("get", "/api/rooms/")),
        ("user", ("post", "/api/rooms/lobby/read/")),
        ("user", ("get", "/api/rooms/lobby/members/")),
        ("anonymous", ("post", "/api/auth/token/refresh/")),
        ("anonymous", ("post", "/api/auth/logout/")),
    ],
)
def test_every_other_api_request_is_limited(alice, rates, who, request_line):
    """Per user, or per client IP before sign-in: a client that hammers the API gets 429 with
    Retry-After, not the database's attention."""
    rates(api="2/min")
    make_room("lobby", owner=alice)
    api = client_for(alice) if who == "user" else APIClient()
    method, path = request_line
    answers = [getattr(api, method)(path, {}, format="json") for _ in range(3)]
    assert [a.status_code == 429 for a in answers] == [False, False, True]
    assert answers[-1].json()["code"] == "throttled"
    assert int(answers[-1]["Retry-After"]) > 0
    # Someone else (another user, another address) is not held back by it.
    other = (
        client_for(make_user("carol")) if who == "user" else APIClient(REMOTE_ADDR="198.51.100.7")
    )
    assert getattr(other, method)(path, {}, format="json").status_code != 429


@pytest.mark.parametrize(
    ("method", "path", "body", "answer"),
    [
        (
            "post",
            "/api/tickets/",
            {},
            {
                "detail": "room: This field is required.",
                "code": "required",
                "errors": {"room": ["This field is required."]},
            },
        ),
        (
            "get",
            "/api/rooms/lobby/messages/?after=1&before=3",
            None,
            {
                "detail": "give before or after, not both",
                "code": "invalid",
                "errors": {"non_field_errors": ["give before or after, not both"]},
            },
        ),
        (
            "patch",
            "/api/rooms/lobby/members/bob/",
            {"role": "king"},
            {
                "detail": 'role: "king" is not a valid choice.',
                "code": "invalid_choice",
                "errors": {"role": ['"king" is not a valid choice.']},
            },
        ),
        (
            "patch",
            "/api/rooms/lobby/members/bob/",
            {},
            {"detail": "nothing to change: give role, muted_until or banned", "code": "invalid"},
        ),
    ],
    ids=["missing-field", "non-field", "bad-choice", "no-field"],
)
def test_every_api_error_has_a_detail_and_a_code(alice, method, path, body, answer):
    """docs/protocol.md: every error answer is {"detail", "code"}; a refused request's fields
    are kept in `errors`. (DRF answered a bare field map, and "error" as the code.)"""
    make_member(make_room("lobby", owner=alice), make_user("bob"))
    api = client_for(alice)
    response = api.get(path) if body is None else getattr(api, method)(path, body, format="json")
    assert (response.status_code, response.json()) == (400, answer)


def _pages(api: APIClient, path: str) -> tuple[list[list[str]], list[str]]:
    """Every page of a list, following its Link headers: the keys of each, and the links."""
    pages, links = [], []
    while path:
        response = api.get(path)
        assert response.status_code == 200
        pages.append([item.get("slug") or item["username"] for item in response.json()])
        link = response.headers.get("Link")
        links.append(link)
        path = link[1 : link.index(">")] if link else None
    return pages, links


def test_room_list_comes_in_pages_linked_by_slug(alice):
    for slug in ["e-room", "a-room", "c-room", "b-room", "d-room"]:
        make_room(slug)
    make_room("z-private", visibility=Room.Visibility.PRIVATE)  # not alice's: never listed
    pages, links = _pages(client_for(alice), "/api/rooms/?limit=2")
    assert pages == [["a-room", "b-room"], ["c-room", "d-room"], ["e-room"]]
    assert links == [
        '</api/rooms/?limit=2&after=b-room>; rel="next"',
        '</api/rooms/?limit=2&after=d-room>; rel="next"',
        None,
    ]


def test_room_list_page_holds_by_key_when_rooms_come_and_go(alice):
    for slug in ["a-room", "b-room", "c-room", "d-room"]:
        make_room(slug)
    api = client_for(alice)
    first = api.get("/api/rooms/?limit=2")
    make_room("aa-room")  # before the next page's start: not repeated, nothing skipped
    Room.objects.filter(slug="c-room").update(archived_at=timezone.now())
    link = first.headers["Link"]
    assert [r["slug"] for r in api.get(link[1 : link.index(">")]).json()] == ["d-room"]


def test_room_list_default_page_is_the_documented_size(alice):
    from chat.serializers import LIST_LIMIT

    Room.objects.bulk_create(
        Room(slug=f"room-{i:04d}", title="t", created_by=alice) for i in range(LIST_LIMIT + 1)
    )
    response = client_for(alice).get("/api/rooms/")
    assert len(response.json()) == LIST_LIMIT
    assert response.headers["Link"] == f'</api/rooms/?after=room-{LIST_LIMIT - 1:04d}>; rel="next"'


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=x", "limit"),
        ("after=" + "a" * 151, "after"),
    ],
)
def test_list_page_queries_are_validated(alice, query, field):
    room = make_room("lobby", owner=alice)
    for path in ("/api/rooms/", f"/api/rooms/{room.slug}/members/"):
        response = client_for(alice).get(f"{path}?{query}")
        assert response.status_code == 400, path
        assert field in response.json()["errors"], path


def test_member_list_comes_in_pages_linked_by_username(alice):
    room = make_room("lobby", owner=alice)
    for name in ["dave", "bob", "erin", "carol"]:
        make_member(room, make_user(name))
    make_member(room, make_user("banned-bo"), banned_at=timezone.now())  # members don't see bans
    pages, links = _pages(client_for(make_user("zed")), f"/api/rooms/{room.slug}/members/?limit=2")
    assert pages == [["alice", "bob"], ["carol", "dave"], ["erin"]]
    assert links[0] == f'</api/rooms/{room.slug}/members/?limit=2&after=bob>; rel="next"'
    pages, _ = _pages(client_for(alice), f"/api/rooms/{room.slug}/members/?limit=3")
    assert pages == [["alice", "banned-bo", "bob"], ["carol", "dave", "erin"]]


def test_member_list_link_encodes_the_username(alice):
    room = make_room("lobby", owner=alice)
    make_member(room, make_user("bob+1@x"))
    make_member(room, make_user("carol"))
    response = client_for(alice).get(f"/api/rooms/{room.slug}/members/?limit=2")
    assert (
        response.headers["Link"]
        == '</api/rooms/lobby/members/?limit=2&after=bob%2B1%40x>; rel="next"'
    )
    link = response.headers["Link"]
    assert [m["username"] for m in client_for(alice).get(link[1 : link.index(">")]).json()] == [
        "carol"
    ]


def test_member_list_of_given_usernames_answers_those_who_are_members(alice):
    """What a page asks about the users its room's presence shows: one request for many of
    them, not every page of the room. Guests and unknown names are left out; banned members,
    as in the list, only for moderators."""
    room = make_room("lobby", owner=alice)
    for name in ["bob", "carol", "dave"]:
        make_member(room, make_user(name))
    make_member(room, make_user("banned-bo"), banned_at=timezone.now())
    make_user("guest-gil")  # an account, not a member
    query = "username=dave&username=guest-gil&username=bob&username=nobody&username=banned-bo"
    path = f"/api/rooms/{room.slug}/members/?{query}"
    as_member = client_for(make_user("zed"))
    response = as_member.get(path)
    assert response.status_code == 200
    assert [m["username"] for m in response.json()] == ["bob", "dave"]
    assert "muted_until" not in response.json()[0]  # moderation data: moderators only
    answer = client_for(alice).get(path).json()
    assert [m["username"] for m in answer] == ["banned-bo", "bob", "dave"]
    assert answer[0]["banned"] is True
    pages, links = _pages(as_member, f"{path}&limit=1")
    assert pages == [["bob"], ["dave"]]
    assert links[0] == f'</api/rooms/{room.slug}/members/?{query}&limit=1&after=bob>; rel="next"'


@pytest.mark.parametrize(
    "query",
    ["username=", "username=" + "u" * 151, "&".join(["username=u"] * 501)],
    ids=["empty", "too long", "too many"],
)
def test_member_list_username_filter_is_validated(alice, query):
    room = make_room("lobby", owner=alice)
    response = client_for(alice).get(f"/api/rooms/{room.slug}/members/?{query}")
    assert response.status_code == 400
    assert "username" in response.json()["errors"]


def test_member_list_finds_members_by_the_start_of_their_name(alice):
    room = make_room("lobby", owner=alice)
    for name in ["bob", "bobby", "carol", "abob"]:
        make_member(room, make_user(name))
    make_member(room, make_user("bob-banned"), banned_at=timezone.now())
    make_user("boris")  # not a member
    path = f"/api/rooms/{room.slug}/members/?q=BO"  # in any case
    found = client_for(make_user("zed")).get(path).json()
    assert [m["username"] for m in found] == ["bob", "bobby"]
    pages, links = _pages(client_for(alice), f"{path}&limit=2")
    assert pages == [["bob", "bob-banned"], ["bobby"]]
    assert links[0] == (
        f'</api/rooms/{room.slug}/members/?q=BO&limit=2&after=bob-banned>; rel="next"'
    )
    too_long = client_for(alice).get(f"/api/rooms/{room.slug}/members/?q={'b' * 151}")
    assert too_long.status_code == 400
    assert "q" in too_long.json()["errors"]


@pytest.mark.parametrize("blank", ["", "%20%20", "%09"], ids=["empty", "spaces", "tab"])
def test_member_list_blank_search_is_no_filter(alice, blank):
    room = make_room("lobby", owner=alice)
    for name in ["bob", "carol"]:
        make_member(room, make_user(name))
    response = client_for(alice).get(f"/api/rooms/{room.slug}/members/?q={blank}")
    assert response.status_code == 200, response.json()
    assert [m["username"] for m in response.json()] == ["alice", "bob", "carol"]
