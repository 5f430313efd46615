"""Django's ASGI handler, with a request's sync work in one thread hop."""

import json
from functools import lru_cache

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers import base
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import connections
from django.http import FileResponse
from django.middleware.security import SecurityMiddleware
from django.urls import Resolver404, get_resolver, set_script_prefix

from chat.protocol import handshake_header
from chatproject.dbthread import database_thread
from chatproject.middleware import UntrustedProxyHeadersMiddleware

_CACHED_PATH_LENGTH = 256  # longer paths are resolved each time, so clients cannot fill the cache


class OneHopASGIHandler(ASGIHandler):
    """Runs a request's sync work, from `request_started` to `request_finished`, in one call.

    Stock Django crosses between the event loop and the sync thread five or six times for a
    request to a sync view (the request_started signal, the middleware chain, the view, the
    template-response render, `response.close()`), and copies every context variable each way.
    At about 0.15 ms of CPU a crossing that was half a ticket request's cost. Here the body is
    read on the loop, then one call does what Django's WSGI handler does, with the same sync
    middleware chain, and Django's own `send_response` sends the finished bytes from the loop.
    `request_finished` thus fires before the bytes go out; a streaming response is closed
    (`request_finished`) in a second call once sent.

    Sync views run in the process's database thread (chatproject/dbthread.py), which the
    sockets' database calls share, with its long-lived connection (stock Django gives each
    request a thread of its own, hence a new connection each time); requests are short, and
    concurrency comes from running several processes. Async views (/healthz, /metrics) run their
    middleware in a pool thread instead, and the view itself on the loop: a health check must
    answer while a stuck query holds the database thread. Which kind a path leads to is read
    from the root URLconf; a middleware that sets `request.urlconf` would not be seen here (none
    does).
    """

    def __init__(self):
        base.BaseHandler.__init__(self)
        self.load_middleware(is_async=False)  # the chain WSGIHandler runs

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        try:
            if limit is not None and _declared_length(scope) > limit:
                raise BodyTooLarge
            body_file = await self.read_body(receive if limit is None else _limited(receive, limit))
        except RequestAborted:
            return
        except BodyTooLarge:
            await _refuse_too_large(send, limit)
            return
        shared_thread = not _leads_to_async_view(scope)
        hop = database_thread.run if shared_thread else _in_pool_thread
        try:
            response = await hop(self._respond, scope, body_file, shared_thread)
            # A closed response with its content in bytes goes out without a thread; a
            # streaming one may still read the request body, and is closed once sent, in the
            # kind of thread the request ran in (request_finished closes its connections).
            await self.send_response(response, send)
            if response.streaming:
                await hop(response.close)
        finally:
            body_file.close()

    def _respond(self, scope, body_file, shared_thread: bool):
        """The response, as WSGIHandler gets it (rendered); unless streaming, closed already
        (request_finished: Django closes the connections it must)."""
        try:
            set_script_prefix(get_script_prefix(scope))
            signals.request_started.send(sender=self.__class__, scope=scope)
            request, response = self.create_request(scope, body_file)
            if request is not None:
                response = self.get_response(request)
            response._handler_class = self.__class__
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size
            if not response.streaming:
                response.close()
            return response
        finally:
            if not shared_thread:
                # A pool thread keeps no persistent connection an async view's ORM call opened.
                connections.close_all()


async def _in_pool_thread(fn, *args):
    return await sync_to_async(fn, thread_sensitive=False)(*args)


class BodyTooLarge(Exception):
    pass


def _declared_length(scope) -> int:
    value = handshake_header(scope, b"content-length")  # an ASGI header, HTTP or WebSocket
    try:
        return int(value) if value else 0
    except ValueError:
        return 0  # daphne has refused the request already


def _limited(receive, limit: int):
    """`receive`, refusing a body past `limit` bytes (BodyTooLarge) before any more is kept.

    Django checks DATA_UPLOAD_MAX_MEMORY_SIZE only when a view reads `request.body` or a form
    (RequestDataTooBig); DRF's parsers read the stream and check nothing, so the API parsed a
    JSON body of any size. A chunked body, which declares no length, is counted as it comes.
    """
    received = 0

    async def limited():
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise BodyTooLarge
        return message

    return limited


async def _refuse_too_large(send, limit: int) -> None:
    """413 in the API's error shape, from here: no view, middleware or thread for it."""
    body = json.dumps(
        {"detail": f"request body too large: at most {limit} bytes", "code": "too_large"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _leads_to_async_view(scope) -> bool:
    path, prefix = scope["path"], get_script_prefix(scope)
    path_info = path.removeprefix(prefix) if prefix else path  # as ASGIRequest computes it
    if len(path_info) > _CACHED_PATH_LENGTH:
        return _async_view.__wrapped__(get_resolver(), path_info)
    return _async_view(get_resolver(), path_info)


@lru_cache(maxsize=1024)
def _async_view(resolver, path_info: str) -> bool:
    """Does the path lead to an async view? Per URLconf (a new resolver when it changes)."""
    try:
        match = resolver.resolve(path_info)
    except Resolver404:
        return False
    return iscoroutinefunction(match.func)


class StaticFilesHandler(ASGIStaticFilesHandler):
    """Django's /static/ handler, for deployments without a proxy in front (chatproject/asgi.py),
    its answers through the two middleware that make every page https only: the redirect to
    https, HSTS, nosniff and the referrer and opener policies. Django's serves a file past
    every middleware: over plain http too, and without those headers over https."""

    def serve(self, request):
        # Made per request: they read the settings when made (tests change them), and cost
        # little beside serving a file.
        served = convert_exception_to_response(super().serve)  # a 404 gets the headers too
        return UntrustedProxyHeadersMiddleware(SecurityMiddleware(served))(request)
