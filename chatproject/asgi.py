"""ASGI entry point: Django for HTTP, the checked room sockets for WebSocket."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django.setup(set_prefix=False)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402

from accounts.middleware import TicketAuthMiddlewareStack  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402


class SharedThreadASGIHandler(ASGIHandler):
    """Django's ASGI handler without its per-request ThreadSensitiveContext.

    Stock Django runs each request's sync code (views, ORM) in a thread of its own, so every
    request opens a new database connection and persistent connections never persist: a third
    of a ticket request's CPU. Here all of a process's sync work shares asgiref's one
    thread-sensitive thread (the one the sockets' database calls use too), with one long-lived
    connection. Requests are short; concurrency comes from running several processes.
    """

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)


application = ProtocolTypeRouter(
    {
        # /static/ for deployments without a proxy in front (the embedded default, tests);
        # anything else goes straight to Django.
        "http": ASGIStaticFilesHandler(SharedThreadASGIHandler()),
        "websocket": TicketAuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    }
)
