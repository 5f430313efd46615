"""ASGI entry point: Django for HTTP, the checked room sockets for WebSocket."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django.setup(set_prefix=False)

from channels.routing import ProtocolTypeRouter  # noqa: E402

from accounts.middleware import TicketAuthMiddlewareStack  # noqa: E402
from chat.consumers import RoomConsumer  # noqa: E402
from chatproject.handlers import OneHopASGIHandler, StaticFilesHandler  # noqa: E402

application = ProtocolTypeRouter(
    {
        # /static/ for deployments without a proxy in front (the embedded default, tests);
        # anything else goes straight to Django.
        "http": StaticFilesHandler(OneHopASGIHandler()),
        # Every path: the consumer serves /ws/rooms/<slug>/; on any other path no ticket
        # matches, and it closes with 4401 (chat/routing.py).
        "websocket": TicketAuthMiddlewareStack(RoomConsumer.as_asgi()),
    }
)
