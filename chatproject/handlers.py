"""Django's ASGI handler, with a sync view's whole request in one thread hop."""

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers import base
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import Resolver404, get_resolver, set_script_prefix


class OneHopASGIHandler(ASGIHandler):
    """Runs a sync view's request, from `request_started` to `request_finished`, in one hop.

    Stock Django crosses between the event loop and the sync thread five or six times for a
    request to a sync view (the request_started signal, the middleware chain, the view, the
    template-response render, `response.close()`), and copies every context variable each way.
    At about 0.15 ms of CPU a crossing that was half a ticket request's cost. Here the body is
    read on the loop, then one call in asgiref's thread-sensitive thread does what Django's
    WSGI handler does, and the finished bytes are sent from the loop.

    Async views (/healthz, /metrics) and streaming responses keep Django's own async path.
    All sync work shares the one thread-sensitive thread and its long-lived database
    connection (stock Django gives each request a thread of its own, hence a new connection
    each time); requests are short, and concurrency comes from running several processes.
    """

    def __init__(self):
        super().__init__()  # the async middleware chain, for async views
        self._sync = base.BaseHandler()
        self._sync.load_middleware(is_async=False)  # the chain WSGIHandler runs

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        if self._async_view(scope):
            await self.handle(scope, receive, send)
            return
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        status, headers, content, response = await sync_to_async(
            self._respond, thread_sensitive=True
        )(scope, body_file)
        if response is not None:  # streaming: sent and closed as Django does
            await self.send_response(response, send)
            await sync_to_async(response.close)()
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for chunk, last in self.chunk_bytes(content):
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})

    @staticmethod
    def _async_view(scope) -> bool:
        try:
            match = get_resolver().resolve(scope["path"])
        except Resolver404:
            return False
        return iscoroutinefunction(match.func)

    def _respond(self, scope, body_file):
        """The request, as WSGIHandler runs it: (status, headers, body, None), or a streaming
        response to be sent (None, None, None, response)."""
        try:
            set_script_prefix(get_script_prefix(scope))
            signals.request_started.send(sender=self.__class__, scope=scope)
            request, response = self.create_request(scope, body_file)
            if request is not None:
                response = self._sync.get_response(request)
            if response.streaming:
                return None, None, None, response
            headers = [
                (
                    header.encode("ascii") if isinstance(header, str) else bytes(header),
                    value.encode("latin1") if isinstance(value, str) else bytes(value),
                )
                for header, value in response.items()
            ]
            headers.extend(
                (b"Set-Cookie", cookie.output(header="").encode("ascii").strip())
                for cookie in response.cookies.values()
            )
            content = response.content
            response.close()  # request_finished: Django closes the connections it must
            return response.status_code, headers, content, None
        finally:
            body_file.close()
