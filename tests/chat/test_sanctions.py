"""Sanctions live on memberships: nothing a user or moderator does to a membership may quietly
lift one, and nobody but moderators learns who is banned or who has an account."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from chat import services
from chat.models import Membership, SecurityEvent
from tests.factories import make_member, make_room, make_user

pytestmark = pytest.mark.django_db


def client_for(user) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


def post(api, client_id: str):
    body = {"body": "hello", "client_id": client_id}
    return api.post("/api/rooms/lobby/messages/", body, format="json")


@pytest.fixture
def lobby():
    owner, mod, bob = make_user("owner"), make_user("mod"), make_user("bob")
    room = make_room("lobby", owner=owner)
    make_member(room, mod, role="moderator")
    make_member(room, bob)
    return room, owner, mod, bob


def mute(room, actor, user):
    until = timezone.now() + timedelta(days=1)
    services.member_mute(actor=actor, room=room, user=user, until=until)


def test_a_muted_member_cannot_leave_to_shed_the_mute(lobby):
    room, owner, _, bob = lobby
    mute(room, owner, bob)
    api = client_for(bob)
    assert post(api, "c1").status_code == 403
    refused = api.delete("/api/rooms/lobby/members/bob/")
    assert refused.status_code == 403
    assert "muted" in refused.json()["detail"]
    assert post(api, "c2").status_code == 403


@pytest.mark.parametrize("visibility", ["public", "read_only", "private"])
def test_a_muted_member_is_not_kicked_out_of_the_mute(lobby, visibility):
    """Deleted, the row would take the mute with it (added again, or in a public room, bob
    would post); kept, it would stay a membership, which reads the room once it is private.
    The moderator bans, or lifts the mute first."""
    room, owner, mod, bob = lobby
    if visibility != "public":
        services.room_update(actor=owner, room=room, visibility=visibility)
    mute(room, owner, bob)
    refused = client_for(mod).delete("/api/rooms/lobby/members/bob/")
    assert refused.status_code == 400
    assert "muted" in refused.json()["detail"]
    assert Membership.objects.get(room=room, user=bob).muted_until is not None
    services.member_mute(actor=mod, room=room, user=bob, until=None)  # lifted: now a kick goes
    assert client_for(mod).delete("/api/rooms/lobby/members/bob/").status_code == 204
    assert not Membership.objects.filter(room=room, user=bob).exists()


def test_a_kick_does_not_lift_a_ban(lobby):
    room, owner, mod, bob = lobby
    services.member_ban(actor=owner, room=room, user=bob)
    assert client_for(mod).delete("/api/rooms/lobby/members/bob/").status_code == 400
    assert Membership.objects.get(room=room, user=bob).banned_at is not None


def test_unmuting_an_outsider_does_not_make_them_a_member_of_a_private_room():
    owner, eve = make_user("owner"), make_user("eve")
    room = make_room("vault", owner=owner, visibility="private")
    api = client_for(owner)
    for until in (None, (timezone.now() + timedelta(hours=1)).isoformat()):
        response = api.patch("/api/rooms/vault/members/eve/", {"muted_until": until}, format="json")
        assert response.status_code == 404
    assert not Membership.objects.filter(room=room, user=eve).exists()
    assert client_for(eve).get("/api/rooms/vault/messages/").status_code == 403


@pytest.mark.parametrize(
    ("method", "data"),
    [
        ("patch", {"muted_until": (timezone.now() + timedelta(hours=1)).isoformat()}),
        ("patch", {"banned": True}),
        ("patch", {"role": "member"}),
        ("delete", None),
    ],
    ids=["mute", "ban", "demote", "remove"],
)
def test_a_moderator_may_not_sanction_another_moderator(lobby, method, data):
    """Moderators act only on lower ranks: a fellow moderator is out of their reach."""
    room, _, mod, _ = lobby
    peer = make_user("peer")
    make_member(room, peer, role="moderator")
    response = getattr(client_for(mod), method)(
        "/api/rooms/lobby/members/peer/", data, format="json"
    )
    assert response.status_code == 403, response.content
    row = Membership.objects.get(room=room, user=peer)
    assert (row.role, row.muted_until, row.banned_at) == ("moderator", None, None)


def test_a_refused_part_of_a_member_update_applies_nothing(lobby):
    room, _, mod, bob = lobby
    until = (timezone.now() + timedelta(hours=1)).isoformat()
    response = client_for(mod).patch(
        "/api/rooms/lobby/members/bob/", {"muted_until": until, "role": "moderator"}, format="json"
    )
    assert response.status_code == 403  # moderators do not make moderators
    row = Membership.objects.get(room=room, user=bob)
    assert (row.role, row.muted_until) == ("member", None)


@pytest.mark.parametrize(
    ("method", "path", "data"),
    [
        ("delete", "/api/rooms/lobby/members/carol/", None),  # banned, hidden from the list
        ("delete", "/api/rooms/lobby/members/dave/", None),  # exists, not a member
        ("delete", "/api/rooms/lobby/members/nobody/", None),  # no such account
        ("patch", "/api/rooms/lobby/members/carol/", {"role": "member"}),
        ("patch", "/api/rooms/lobby/members/nobody/", {"role": "member"}),
        ("post", "/api/rooms/lobby/members/", {"username": "dave"}),
        ("post", "/api/rooms/lobby/members/", {"username": "nobody"}),
    ],
)
def test_members_learn_nothing_about_others_from_member_endpoints(lobby, method, path, data):
    room, owner, _, bob = lobby
    services.member_ban(actor=owner, room=room, user=make_user("carol"))
    make_user("dave")
    response = getattr(client_for(bob), method)(path, data, format="json")
    assert (response.status_code, response.json()["detail"]) in {
        (403, "you may not change other members"),
        (403, "only moderators add members"),
    }


@pytest.mark.parametrize(
    ("method", "path", "data"),
    [
        ("delete", "/api/rooms/lobby/messages/9223372036854775808/", None),
        ("delete", "/api/rooms/lobby/messages/99999999999999999999999/", None),
        ("get", "/api/rooms/lobby/messages/?before=9223372036854775808", None),
        ("get", "/api/rooms/lobby/messages/?after=99999999999999999999999", None),
        ("post", "/api/rooms/lobby/read/", {"seq": 9223372036854775808}),
        ("patch", "/api/rooms/lobby/members/a%00b/", {"role": "member"}),
        ("delete", "/api/rooms/lobby/members/%00/", None),
    ],
    ids=["delete-2^63", "delete-huge", "before-2^63", "after-huge", "read-2^63", "nul", "nul2"],
)
def test_numbers_and_names_that_cannot_exist_are_4xx_not_500(lobby, method, path, data):
    _, owner, _, _ = lobby
    response = getattr(client_for(owner), method)(path, data, format="json")
    assert response.status_code in (400, 404), (connection.vendor, response.content[:200])


@pytest.mark.parametrize(
    "text", ["evil\u202egnp.exe", "two\nlines", "tab\there", "nul\x00", "isolate\u2066x\u2069"]
)
@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("post", "/api/rooms/", "title"),
        ("patch", "/api/rooms/lobby/", "title"),
        ("patch", "/api/rooms/lobby/members/bob/", "reason"),
        ("post", "/api/rooms/lobby/archive/", "reason"),
    ],
)
def test_names_and_reasons_shown_to_others_are_plain_text(lobby, text, method, path, field):
    _, owner, _, _ = lobby
    data = {field: text}
    if path == "/api/rooms/":
        data |= {"slug": "new-room"}
    elif field == "reason" and "members" in path:
        data |= {"banned": True}
    response = getattr(client_for(owner), method)(path, data, format="json")
    assert response.status_code == 400
    assert "plain text" in str(response.json())


@pytest.mark.parametrize(
    ("visibility", "before", "member_after"),
    [
        ("private", "outsider", False),  # the row only held the ban: it goes with it
        ("public", "outsider", False),
        ("private", "member", True),  # a member banned is a member again
        ("public", "outsider, muted after the ban", True),  # the mute stays, as a member
    ],
)
def test_lifting_a_ban_restores_what_there_was_before_it(visibility, before, member_after):
    """A ban of someone who never joined makes a row to keep them out; lifting it made them a
    member, of a private room too (found by review)."""
    owner, eve = make_user("owner"), make_user("eve")
    room = make_room("vault", owner=owner, visibility=visibility)
    if before == "member":
        make_member(room, eve)
    api = client_for(owner)
    assert (
        api.patch("/api/rooms/vault/members/eve/", {"banned": True}, format="json").status_code
        == 200
    )
    if before.endswith("muted after the ban"):
        mute(room, owner, eve)
    assert client_for(eve).get("/api/rooms/vault/messages/").status_code == 403
    lifted = api.patch("/api/rooms/vault/members/eve/", {"banned": False}, format="json")
    # What is left: the member, or nothing (204), never a member that is not one.
    assert lifted.status_code == (200 if member_after else 204)
    if member_after:
        assert (lifted.json()["banned"], lifted.json()["role"]) == (False, "member")
    assert Membership.objects.filter(room=room, user=eve).exists() is member_after
    can_read = member_after or visibility == "public"
    reading = client_for(eve).get("/api/rooms/vault/messages/").status_code
    assert reading == (200 if can_read else 403)
    assert SecurityEvent.objects.filter(event="member_unbanned", target_id=eve.pk).count() == 1
