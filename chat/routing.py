"""Where a room's socket is: /ws/rooms/<slug>/.

Every WebSocket path is served by chat.consumers.RoomConsumer (chatproject/asgi.py): a path that
names no room is refused at its ticket, which names a room (4401: room_mismatch, or
ticket_missing), before anything else is read, and audited like the rest. So
no URL router sits between the middleware and the consumer; it would only copy the scope (and
hold the copy, a frame and two dicts, 1.4 KB, for as long as each socket is open).
"""

import re

SLUG_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?"
_ROOM_PATH = re.compile(rf"^/ws/rooms/(?P<slug>{SLUG_PATTERN})/$")


def room_slug_from_path(path: str) -> str:
    match = _ROOM_PATH.match(path)
    return match["slug"] if match else ""
