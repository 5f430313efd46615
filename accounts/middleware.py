"""WebSocket handshake checks: a strict Origin allow-list, then the single-use ticket."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from accounts import services
from accounts.ip import client_ip_from_scope, limit_key
from chat import audit
from chat.protocol import TICKET_SUBPROTOCOL_PREFIX, chosen_subprotocol, handshake_header
from chat.routing import room_slug_from_path
from chat.runtime import get_runtime
from chat.state import StateUnavailable
from chatproject.dbthread import database_sync_to_async

logger = logging.getLogger("accounts.middleware")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalise_origin(value: str) -> str | None:
    """`scheme://host[:port]` in canonical form (lowercase, default port dropped), or None."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if not parts.hostname.isascii():
        # Browsers send a serialised origin: an internationalised name in punycode
        # (xn--bcher-kva.example), never as written. An allow-list entry in Unicode matched no
        # browser at all (chat.E004 refuses it).
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    if not origin or origin == "null":
        return False
    canonical = normalise_origin(origin)
    return canonical is not None and canonical in {normalise_origin(a) for a in allowed}


class StrictOriginMiddleware:
    """Refuses (HTTP 403) a WebSocket handshake unless its Origin is exactly an allowed origin.

    Exact scheme, host and port, unlike channels' AllowedHostsOriginValidator, which ignores scheme
    and port. A missing or `null` Origin is refused: browsers always send one, and cross-site
    WebSocket hijacking is exactly a browser sending someone else's cookies from another origin.
    The refusal happens before any ticket is looked at, so none is consumed.
    """

    def __init__(self, inner, allowed_origins: list[str] | None = None) -> None:
        self.inner = inner
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return await self.inner(scope, receive, send)
        allowed = (
            self.allowed_origins
            if self.allowed_origins is not None
            else settings.CHAT_ALLOWED_ORIGINS
        )
        if origin_allowed(handshake_header(scope, b"origin"), allowed):
            return await self.inner(scope, receive, send)
        scope = dict(scope, client_ip=client_ip_from_scope(scope))
        runtime = get_runtime()
        record = audit.ConnectionAudit(scope, room_slug=room_slug_from_path(scope["path"]))
        await record.decide(
            runtime, outcome=audit.Outcome.REJECTED, reason=audit.Reason.ORIGIN_DENIED
        )
        # Closing before accepting makes the server answer the handshake with HTTP 403.
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 4403})
        record.close(runtime, code=403)
        return None


@database_sync_to_async
def _redeem(token: str, room_slug: str, ip: str | None) -> services.Redemption:
    return services.ticket_redeem(token=token, room_slug=room_slug, ip=ip)


def take_ticket(scope: Scope) -> tuple[str | None, str]:
    """The ticket and how it came (subprotocol first, then query string; else the first frame),
    taken out of the scope: out of the offered subprotocols, their header and the query string.

    The scope is changed in place, against ASGI's advice to copy, on purpose: the scope daphne
    built is held by every application frame above this one (the router, the origin check) for
    as long as the socket lives, and a copy would leave the credential there. The ticket is
    redeemed at connect and needed nowhere after; a scope that a log line, an error report or a
    debugger prints later carries no credential.
    """
    offered = scope.get("subprotocols", [])
    query = parse_qsl(scope.get("query_string", b"").decode("latin1"), keep_blank_values=True)
    in_protocols = [p[len(TICKET_SUBPROTOCOL_PREFIX) :] for p in offered if _is_ticket(p)]
    in_query = [value for key, value in query if key == _TICKET_QUERY_KEY and value]
    if in_protocols:
        token, transport = in_protocols[0], audit.Transport.SUBPROTOCOL
    elif in_query:
        token, transport = in_query[0], audit.Transport.QUERY
    else:
        return None, audit.Transport.FIRST_FRAME
    scope["subprotocols"] = [p for p in offered if not _is_ticket(p)]
    # A new list: daphne's own is the one it built the handshake from.
    scope["headers"] = [
        (name, _without_ticket_protocol(value) if name == b"sec-websocket-protocol" else value)
        for name, value in scope.get("headers", [])
    ]
    scope["query_string"] = urlencode([(k, v) for k, v in query if k != _TICKET_QUERY_KEY]).encode()
    return token, transport


_TICKET_QUERY_KEY = "ticket"


def _is_ticket(offered: str) -> bool:
    return offered.startswith(TICKET_SUBPROTOCOL_PREFIX)


def _without_ticket_protocol(value: bytes) -> bytes:
    offered = (p.strip() for p in value.decode("latin1").split(","))
    return ", ".join(p for p in offered if not _is_ticket(p)).encode("latin1")


class TicketAuthMiddleware:
    """Authenticates a WebSocket by its single-use ticket; the consumer acts on the result.

    Sets scope["user"] and scope["ticket"] (a services.Grant) on success; on failure
    scope["user"] is anonymous and scope["auth_error"] holds the precise reason (for the audit
    trail, never for the client). With no ticket in the handshake it accepts the socket and
    waits CHAT_AUTH_TIMEOUT for a first frame {"type": "auth", "ticket": ...}; the inner
    application then sees an ordinary connect.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return await self.inner(scope, receive, send)
        # In place, as take_ticket(): a copy would be one more dict per open socket (0.5 KB),
        # and nothing above this middleware reads the scope after handing it on.
        token, transport = take_ticket(scope)
        scope.update(user=AnonymousUser(), ticket=None, auth_error="")
        scope["client_ip"] = client_ip_from_scope(scope)
        scope["room_slug"] = room_slug_from_path(scope["path"])
        scope["ticket_transport"] = transport
        runtime = get_runtime()

        try:
            allowed = not scope["client_ip"] or await runtime.state.take_token(
                f"connect:{limit_key(scope['client_ip'])}",
                settings.CHAT_CONNECT_RATE_PER_IP / 60.0,
                settings.CHAT_CONNECT_RATE_PER_IP,
            )
        except StateUnavailable:
            scope["auth_error"] = audit.Reason.UNAVAILABLE
            return await self.inner(scope, receive, send)
        if not allowed:
            scope["auth_error"] = audit.Reason.TOO_MANY_CONNECTIONS
            return await self.inner(scope, receive, send)

        if transport == audit.Transport.FIRST_FRAME:
            token, receive, send = await self._first_frame(scope, receive, send)
            if token is None:
                return await self.inner(scope, receive, send)

        try:
            await self._authenticate(scope, token)
        except Exception as error:
            # The database failed mid-redemption (or a bug): the consumer still records the
            # attempt, as unavailable (1013: try again later). The type only: nothing that
            # could carry the ticket reaches the log.
            logger.warning("ticket redemption failed: %s", type(error).__name__)
            scope["auth_error"] = audit.Reason.UNAVAILABLE
        # This frame lives as long as the socket: it keeps no ticket from a first frame.
        del token
        return await self.inner(scope, receive, send)

    @staticmethod
    async def _authenticate(scope: Scope, token: str | None) -> None:
        if not token:
            scope["auth_error"] = audit.Reason.TICKET_MISSING
            return
        result = await _redeem(token, scope["room_slug"], scope["client_ip"])
        scope["ticket_jti"] = result.jti
        if result.error:
            scope["auth_error"] = result.error
        else:
            scope["user"], scope["ticket"] = result.user, result.grant

    async def _first_frame(
        self, scope: Scope, receive: Receive, send: Send
    ) -> tuple[str | None, Receive, Send]:
        """Accept, await the auth frame, hand the inner app a replayed, accept-free stream."""
        replay: list[dict[str, Any]] = []
        connect = await receive()
        replay.append(connect)
        token: str | None = None
        if connect["type"] == "websocket.connect":
            await send({"type": "websocket.accept", "subprotocol": chosen_subprotocol(scope)})
            try:
                first = await asyncio.wait_for(receive(), timeout=settings.CHAT_AUTH_TIMEOUT)
            except TimeoutError:
                scope["auth_error"] = audit.Reason.AUTH_TIMEOUT
            else:
                if first["type"] == "websocket.receive":
                    token = _auth_frame_ticket(first.get("text"))
                    if token is None:
                        scope["auth_error"] = audit.Reason.TICKET_MISSING
                else:
                    scope["auth_error"] = audit.Reason.TICKET_MISSING
                    replay.append(first)
        scope["socket_accepted"] = True

        async def replaying_receive() -> dict[str, Any]:
            if replay:
                return replay.pop(0)
            return await receive()

        async def accept_free_send(message: dict[str, Any]) -> None:
            if message["type"] != "websocket.accept":
                await send(message)

        return token, replaying_receive, accept_free_send


def _auth_frame_ticket(text: str | None) -> str | None:
    if not text or len(text) > 8192:
        return None
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):  # as chat.consumers._parse: deep nesting fits in 8 KiB
        return None
    if (
        isinstance(frame, dict)
        and frame.get("type") == "auth"
        and isinstance(frame.get("ticket"), str)
    ):
        return frame["ticket"]
    return None


def TicketAuthMiddlewareStack(inner):
    """The WebSocket guard, outermost first: Origin allow-list, then ticket."""
    return StrictOriginMiddleware(TicketAuthMiddleware(inner))
