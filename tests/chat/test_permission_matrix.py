"""The room policy, as the issue states it, checked through the socket and through the REST API.

The expected outcome of every (role, visibility, action) is written here from the specification,
independently of chat/permissions.py, and the same matrix drives both entry points.
"""

import json

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone
from rest_framework.test import APIClient

from chat.models import Membership, Message, Room
from tests.factories import make_member, make_room, make_ticket, make_user
from tests.ws import closed_with, communicator, receive_until

ROLES = ["owner", "moderator", "member", "outsider", "banned", "staff"]
VISIBILITIES = ["public", "private", "read_only"]
SOCKET_ACTIONS = ["post", "delete_own", "delete_other", "typing"]
API_ACTIONS = ["view", "post", "delete_own", "delete_other", "moderate"]


def allowed(role: str, visibility: str, action: str) -> bool:
    """The specification (issue 3), restated."""
    moderator = role in ("owner", "moderator", "staff")
    if role == "banned":
        view = False
    elif visibility == "private":
        view = role != "outsider"
    else:
        view = True
    if action == "view":
        return view
    if action in ("post", "typing"):
        return view and (visibility != "read_only" or moderator)
    if action == "delete_own":
        return view
    # delete_other, moderate (mute a plain member)
    return view and moderator


def build(role: str, visibility: str):
    """A room with an owner, a plain member, the actor, and one message by each of the last two."""
    owner = make_user("owner")
    room = make_room("room", visibility=visibility, owner=owner if role != "owner" else None)
    actor = make_user("actor", is_staff=(role == "staff"))
    if role == "owner":
        make_member(room, actor, Membership.Role.OWNER)
    elif role in ("moderator", "member"):
        make_member(room, actor, role)
    elif role == "banned":
        make_member(room, actor, banned_at=timezone.now())
    victim = make_user("victim")
    make_member(room, victim)
    # Seed messages directly: the policy under test is about acting on them.
    Message.objects.create(room=room, seq=1, author=actor, body="mine", client_id="m1")
    Message.objects.create(room=room, seq=2, author=victim, body="theirs", client_id="t1")
    Room.objects.filter(pk=room.pk).update(last_seq=2)
    return room, actor


MATRIX = [(r, v) for r in ROLES for v in VISIBILITIES]


# --- through the socket ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("role", "visibility"), MATRIX)
@pytest.mark.parametrize("action", ["view", *SOCKET_ACTIONS])
async def test_socket_enforces_policy(role, visibility, action):
    room, actor = await database_sync_to_async(build)(role, visibility)
    token = await database_sync_to_async(make_ticket)(actor, room)
    comm = communicator("/ws/rooms/room/", ticket=token)
    assert (await comm.connect())[0]
    if not allowed(role, visibility, "view"):
        assert (await closed_with(comm))[0] == 4403
        return
    hello = await receive_until(comm, "hello")
    if action == "view":
        assert hello["can_post"] == allowed(role, visibility, "post")
        assert hello["moderator"] == allowed(role, visibility, "delete_other")
    elif action == "post":
        await comm.send_json_to({"type": "message", "body": "hello", "client_id": "new"})
        reply = await receive_until(comm, "ack" if allowed(role, visibility, action) else "error")
        if reply["type"] == "error":
            assert reply["code"] == "forbidden"
    elif action in ("delete_own", "delete_other"):
        seq = 1 if action == "delete_own" else 2
        await comm.send_json_to({"type": "delete", "seq": seq})
        if allowed(role, visibility, action):
            assert (await receive_until(comm, "deleted"))["seq"] == seq
        else:
            assert (await receive_until(comm, "error"))["code"] == "forbidden"
    elif action == "typing":
        await comm.send_json_to({"type": "typing"})
        await comm.send_json_to({"type": "ping"})
        # Every frame up to the pong: typing is never echoed to its sender, so an allowed one
        # answers nothing before it, a refused one an error.
        answers = [json.loads(await comm.receive_from())]
        while answers[-1]["type"] != "pong":
            answers.append(json.loads(await comm.receive_from()))
        errors = [f["code"] for f in answers if f["type"] == "error"]
        assert errors == ([] if allowed(role, visibility, action) else ["forbidden"])
    await comm.disconnect()


# --- through the REST API -------------------------------------------------------------------------


def api_attempt(role: str, visibility: str, action: str) -> int:
    room, actor = build(role, visibility)
    api = APIClient()
    api.force_authenticate(actor)
    base = f"/api/rooms/{room.slug}"
    if action == "view":
        return api.get(f"{base}/messages/").status_code
    if action == "post":
        return api.post(
            f"{base}/messages/", {"body": "hi", "client_id": "new"}, format="json"
        ).status_code
    if action == "delete_own":
        return api.delete(f"{base}/messages/1/").status_code
    if action == "delete_other":
        return api.delete(f"{base}/messages/2/").status_code
    until = (timezone.now() + timezone.timedelta(minutes=5)).isoformat()
    return api.patch(f"{base}/members/victim/", {"muted_until": until}, format="json").status_code


@pytest.mark.django_db
@pytest.mark.parametrize(("role", "visibility"), MATRIX)
@pytest.mark.parametrize("action", API_ACTIONS)
def test_api_enforces_policy(role, visibility, action):
    status = api_attempt(role, visibility, action)
    if allowed(role, visibility, action):
        assert status in (200, 201, 204), status
    else:
        assert status == 403, status
