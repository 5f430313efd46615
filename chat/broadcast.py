"""Events for the per-process hubs (chat/hub.py), published on the channel layer after commit."""

import logging
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from chat import frames

logger = logging.getLogger("chat.broadcast")


def room_group(room_id: int) -> str:
    return f"room.{room_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def _send(group: str, event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    try:
        async_to_sync(layer.group_send)(group, event)
    except Exception:
        # The database already holds the truth; clients catch up through history and gap filling.
        logger.exception("could not publish %s to %s", event.get("type"), group)


def publish(group: str, event: dict[str, Any]) -> None:
    """Publish once the current transaction commits (at once when there is none)."""
    transaction.on_commit(lambda: _send(group, event), robust=True)


async def apublish(group: str, event: dict[str, Any]) -> None:
    """Publish from async code that holds no transaction (typing, presence)."""
    await get_channel_layer().group_send(group, event)


# Event constructors: the hub is the only reader of these shapes.


def messages_event(room_id: int, items: list[tuple[int, str]]) -> dict[str, Any]:
    # `ts` (publication time) lets every hub measure delivery latency.
    return {
        "type": "hub.messages",
        "room": room_id,
        "items": [list(i) for i in items],
        "ts": time.time(),
    }


def frame_event(
    room_id: int,
    text: str,
    *,
    exclude_user: int | None = None,
    seq: int | None = None,
    version: int | None = None,
) -> dict[str, Any]:
    """A ready frame for the room's sockets (all, or all but one user's). With `seq`, it is
    about that message (deleted, restored): each hub sends it only after the message itself.
    `version` orders the changes to that message: the chain position of the audit row that
    recorded the change, which a later change always has higher (both hold the room's lock, and
    the chain is one sequence). Each hub drops a change older than one it has already sent."""
    event = {"type": "hub.frame", "room": room_id, "text": text, "exclude_user": exclude_user}
    if seq is not None:
        event["seq"] = seq
        if version is not None:
            event["version"] = version
    return event


def presence_event(
    room_id: int, username: str, text: str, version: int, *, exclude_user: int | None = None
) -> dict[str, Any]:
    """A join or a leave of `username` (`text`), made at the room's presence `version`
    (chat.state)."""
    return {
        "type": "hub.presence",
        "room": room_id,
        "user": username,
        "text": text,
        "version": version,
        "exclude_user": exclude_user,
    }


def departure_event(room_id: int, room_slug: str, username: str, version: int) -> dict[str, Any]:
    """`username` left the room at its presence `version`: their last socket there closed, or
    their leases lapsed (chat.state). To everyone in the room, as a presence frame."""
    return presence_event(room_id, username, frames.presence(room_slug, left=username), version)


def membership_event(
    room_id: int,
    user_id: int,
    state: dict[str, Any] | None,
    text: str | None,
    close: tuple[int, str] | None = None,
    *,
    version: int | None = None,
) -> dict[str, Any]:
    """`version`: the chain position of the change's audit row, as for a message's changes
    (frame_event): a socket drops a membership change older than its state."""
    return {
        "type": "hub.membership",
        "room": room_id,
        "user": user_id,
        "state": state,
        "text": text,
        "close": list(close) if close else None,
        "version": version,
    }


def room_state_event(
    room_id: int, state: dict[str, Any], texts: list[str], *, version: int | None = None
) -> dict[str, Any]:
    """`texts`: the room frame for sockets that may not post, then for those that may.
    `version`: as for a membership change."""
    return {"type": "hub.room", "room": room_id, "state": state, "texts": texts, "version": version}


def revoke_event(
    *,
    code: int,
    reason: str,
    user_id: int | None = None,
    room_id: int | None = None,
    credential: str | None = None,
    spare_staff: bool = False,
) -> dict[str, Any]:
    """`spare_staff`: not for a socket with staff powers, which pass over a ban or a removal
    (the hub's, for such a change whose live event was lost)."""
    event = {
        "type": "hub.revoke",
        "user": user_id,
        "room": room_id,
        "credential": credential,
        "code": code,
        "reason": reason,
    }
    if spare_staff:
        event["spare_staff"] = True
    return event
