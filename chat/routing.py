"""WebSocket URL routes."""

import re

from django.urls import re_path

from chat.consumers import RoomConsumer

SLUG_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?"
_ROOM_PATH = re.compile(rf"^/ws/rooms/(?P<slug>{SLUG_PATTERN})/$")

websocket_urlpatterns = [
    re_path(rf"^ws/rooms/(?P<slug>{SLUG_PATTERN})/$", RoomConsumer.as_asgi()),
    # Anything else gets the same treatment as an unknown room (close 4404), audited like the rest.
    re_path(r"", RoomConsumer.as_asgi()),
]


def room_slug_from_path(path: str) -> str:
    match = _ROOM_PATH.match(path)
    return match["slug"] if match else ""
