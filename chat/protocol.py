"""Names and numbers of the WebSocket protocol (docs/protocol.md is the reference)."""

from typing import Any

SUBPROTOCOL = "chat.v1"
TICKET_SUBPROTOCOL_PREFIX = "ticket."

# Close codes. 4xxx mirror HTTP statuses so a client knows what to do at a glance.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # server shutting down: reconnect
CLOSE_TOO_BIG = 1009  # frame over CHAT_MAX_FRAME_BYTES
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # a backing service (database, Redis) is unavailable: reconnect later
CLOSE_UNAUTHORIZED = 4401  # ticket or session no longer valid: get a new ticket, reconnect
CLOSE_FORBIDDEN = 4403  # no access to the room (removed, banned): stop
CLOSE_ROOM_GONE = 4404  # unknown or archived room: stop
CLOSE_AUTH_TIMEOUT = 4408  # no ticket within CHAT_AUTH_TIMEOUT
CLOSE_RATE_LIMITED = 4429  # too many connections or repeated abuse: back off

# The short, generic reasons sent with close frames. The precise reason goes to the audit trail.
CLOSE_REASONS = {
    CLOSE_UNAUTHORIZED: "authentication failed",
    CLOSE_FORBIDDEN: "forbidden",
    CLOSE_ROOM_GONE: "room not found",
    CLOSE_AUTH_TIMEOUT: "authentication timeout",
    CLOSE_RATE_LIMITED: "rate limited",
    CLOSE_TOO_BIG: "message too big",
    CLOSE_GOING_AWAY: "server going away",
    CLOSE_TRY_AGAIN: "try again later",
}

# Error frame codes; the socket stays open.
ERR_INVALID_FRAME = "invalid_frame"
ERR_UNKNOWN_TYPE = "unknown_type"
ERR_TOO_LONG = "too_long"
ERR_FORBIDDEN = "forbidden"
ERR_NOT_FOUND = "not_found"
ERR_MUTED = "muted"
ERR_RATE_LIMITED = "rate_limited"
ERR_UNAVAILABLE = "unavailable"


def handshake_header(scope: dict[str, Any], name: bytes) -> str | None:
    """The first value of a handshake header (`name` in lower case, as ASGI gives it), or None."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin1")
    return None


def chosen_subprotocol(scope: dict[str, Any]) -> str | None:
    """The subprotocol a socket is accepted with: ours if offered, never the ticket. A browser
    fails the handshake when the server picks nothing it offered, and an echoed ticket would sit
    in every proxy log."""
    return SUBPROTOCOL if SUBPROTOCOL in scope.get("subprotocols", []) else None


def resync_max_seqs(max_frame_bytes: int) -> int:
    """How many seqs one resync may cover: its request lists the deleted ones among them (up to
    21 bytes each), which must fit in half a frame the server accepts. 1,000 at the default."""
    return max(1, min(1000, (max_frame_bytes // 2 - 200) // 21))
