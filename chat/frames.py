"""Everything the server says over a socket, built in one place and serialized once."""

import json
from typing import Any

from autobahn.websocket.protocol import PreparedMessage

from chat.models import Message

# One encoder for every frame: json.dumps() with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(data: dict[str, Any]) -> str:
    return _ENCODER.encode(data)


def prepared(text: str) -> PreparedMessage:
    """A text frame framed once, for the protocol's send_prepared (chatproject/server.py)."""
    return PreparedMessage(text.encode("utf-8"), False, False, False)


def iso(value) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def message_data(message: Message, *, room_slug: str, author_name: str | None) -> dict[str, Any]:
    """A message as clients see it, live, in history and in the REST API. Deleted: a tombstone."""
    data: dict[str, Any] = {
        "seq": message.seq,
        "room": room_slug,
        "author": author_name,
        "created_at": iso(message.created_at),
    }
    if message.deleted_at is not None:
        data["deleted"] = True
        return data
    data["body"] = message.body
    data["client_id"] = message.client_id
    return data


def message(data: dict[str, Any]) -> str:
    return dumps({"type": "message", **data})


def ack(client_id: str, seq: int) -> str:
    return dumps({"type": "ack", "client_id": client_id, "seq": seq})


def error(code: str, detail: str, **extra: Any) -> str:
    return dumps({"type": "error", "code": code, "detail": detail, **extra})


def deleted(room_slug: str, seq: int) -> str:
    return dumps({"type": "deleted", "room": room_slug, "seq": seq})


def restored(data: dict[str, Any]) -> str:
    return dumps({"type": "restored", "message": data})


def typing(room_slug: str, username: str) -> str:
    return dumps({"type": "typing", "room": room_slug, "user": username})


def presence(room_slug: str, *, joined: str | None = None, left: str | None = None) -> str:
    change = {"joined": joined} if joined is not None else {"left": left}
    return dumps({"type": "presence", "room": room_slug, **change})


def room(room_slug: str, *, title: str, visibility: str, can_post: bool) -> str:
    return dumps(
        {
            "type": "room",
            "room": room_slug,
            "title": title,
            "visibility": visibility,
            "can_post": can_post,
        }
    )


def membership(room_slug: str, *, role: str | None, muted_until) -> str:
    return dumps(
        {"type": "membership", "room": room_slug, "role": role, "muted_until": iso(muted_until)}
    )


PONG = dumps({"type": "pong"})
