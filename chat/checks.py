"""Security system checks of our own (chat.E0xx, chat.W0xx); docs/security.md lists them all."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import import_string
from rest_framework.throttling import SimpleRateThrottle

from accounts.ip import proxy_network

# daphne 4.2.2 fixed CVE-2026-44545 (it passed no frame or message size limit to autobahn) and
# CVE-2026-44546 (header injection through a parser differential with autobahn).
DAPHNE_MIN_VERSION = (4, 2, 2)
# Far above any chat frame; above this a "limit" no longer protects the server's memory.
MAX_FRAME_BYTES_CEILING = 16 * 1024 * 1024
MIN_KEY_LENGTH = 32
IN_MEMORY_LAYER = "channels.layers.InMemoryChannelLayer"

Messages = list[CheckMessage]


def _production() -> bool:
    return not settings.DEBUG


def check_websocket_guard(app_configs=None, **kwargs: Any) -> Messages:
    """The WebSocket route must be StrictOriginMiddleware(TicketAuthMiddleware(...))."""
    # Imported when the check runs: the ASGI module sets Django up and imports the consumers.
    from channels.routing import ProtocolTypeRouter

    from accounts.middleware import StrictOriginMiddleware, TicketAuthMiddleware

    hint = (
        'Route "websocket" through accounts.middleware.TicketAuthMiddlewareStack(...), which is '
        "StrictOriginMiddleware(TicketAuthMiddleware(inner))."
    )
    application = import_string(settings.ASGI_APPLICATION)
    if not isinstance(application, ProtocolTypeRouter):
        return [
            Error(
                f"{settings.ASGI_APPLICATION} is not a ProtocolTypeRouter.",
                hint=hint,
                id="chat.E001",
            )
        ]
    websocket = application.application_mapping.get("websocket")
    if not isinstance(websocket, StrictOriginMiddleware):
        return [
            Error(
                "The WebSocket route has no strict Origin check: cross-site WebSocket hijacking "
                "is possible.",
                hint=hint,
                id="chat.E001",
            )
        ]
    if not isinstance(websocket.inner, TicketAuthMiddleware):
        return [
            Error(
                "The WebSocket route's Origin check does not wrap TicketAuthMiddleware: sockets "
                "are not authenticated by tickets.",
                hint=hint,
                id="chat.E001",
            )
        ]
    return []


def _wildcard_host(host: str) -> bool:
    return "*" in host or host.startswith(".")


def check_allowed_hosts(app_configs=None, **kwargs: Any) -> Messages:
    """No wildcard in ALLOWED_HOSTS in production: Host header poisoning of absolute URLs."""
    if not _production():
        return []
    wildcards = [host for host in settings.ALLOWED_HOSTS if _wildcard_host(host)]
    if not wildcards:
        return []
    return [
        Error(
            f"ALLOWED_HOSTS contains wildcards in production: {wildcards}.",
            hint="List the exact host names the site is served under (DJANGO_ALLOWED_HOSTS).",
            id="chat.E002",
        )
    ]


def _release(text: str) -> tuple[int, ...]:
    """The release numbers of a version: 4.2.3 -> (4, 2, 3). Suffixes (rc1, +local) are ignored."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def check_daphne_version(app_configs=None, **kwargs: Any) -> Messages:
    try:
        installed = version("daphne")
    except PackageNotFoundError:
        return []
    if _release(installed) >= DAPHNE_MIN_VERSION:
        return []
    floor = ".".join(map(str, DAPHNE_MIN_VERSION))
    return [
        Error(
            f"daphne {installed} is installed; {floor} or later is required.",
            hint=(
                f"Upgrade daphne (requirements.txt): before {floor} WebSocket frames had no size "
                "limit (CVE-2026-44545) and headers could be injected (CVE-2026-44546)."
            ),
            id="chat.E003",
        )
    ]


def _not_exact_origin(origin: str) -> bool:
    from accounts.middleware import normalise_origin

    canonical = normalise_origin(origin)
    return canonical is None or _wildcard_host(canonical.split("://", 1)[1])


def check_allowed_origins(app_configs=None, **kwargs: Any) -> Messages:
    """CHAT_ALLOWED_ORIGINS in production: a non-empty list of exact scheme://host[:port]."""
    if not _production():
        return []
    hint = (
        "Set CHAT_ALLOWED_ORIGINS to the exact origins of the site, e.g. https://chat.example.com."
    )
    origins = list(settings.CHAT_ALLOWED_ORIGINS)
    if not origins:
        return [
            Error(
                "CHAT_ALLOWED_ORIGINS is empty in production: every WebSocket is refused.",
                hint=hint,
                id="chat.E004",
            )
        ]
    inexact = [origin for origin in origins if _not_exact_origin(origin)]
    if inexact:
        return [
            Error(
                f"CHAT_ALLOWED_ORIGINS holds entries that are not exact origins: {inexact}.",
                hint=hint + " No wildcards, paths or leading dots.",
                id="chat.E004",
            )
        ]
    return []


def check_frame_limits(app_configs=None, **kwargs: Any) -> Messages:
    errors: Messages = []
    frame_bytes = settings.CHAT_MAX_FRAME_BYTES
    if not isinstance(frame_bytes, int) or not 0 < frame_bytes <= MAX_FRAME_BYTES_CEILING:
        errors.append(
            Error(
                f"CHAT_MAX_FRAME_BYTES is {frame_bytes!r}: the frame size limit is disabled.",
                hint=f"Use a positive size of at most {MAX_FRAME_BYTES_CEILING} bytes "
                "(default 65536): unbounded frames exhaust the server's memory.",
                id="chat.E005",
            )
        )
    length = settings.CHAT_MAX_MESSAGE_LENGTH
    if not isinstance(length, int) or length <= 0:
        errors.append(
            Error(
                f"CHAT_MAX_MESSAGE_LENGTH is {length!r}: message bodies have no length limit.",
                hint="Use a positive number of characters (default 4000).",
                id="chat.E008",
            )
        )
    return errors


# A socket's rates and their bursts: a rate of 0 or less would refuse (or, for reads, fail)
# every frame of its kind; a burst below 1 would refuse the first.
_SOCKET_RATES = (
    ("CHAT_MESSAGE_RATE", "CHAT_MESSAGE_BURST"),
    ("CHAT_READ_RATE", "CHAT_READ_BURST"),
)


def _positive(value: Any) -> bool:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def check_socket_rates(app_configs=None, **kwargs: Any) -> Messages:
    errors: Messages = []
    for rate_name, burst_name in _SOCKET_RATES:
        rate, burst = getattr(settings, rate_name), getattr(settings, burst_name)
        if not _positive(rate) or not isinstance(burst, int) or burst < 1:
            errors.append(
                Error(
                    f"{rate_name} is {rate!r} and {burst_name} is {burst!r}: sockets could "
                    "send nothing of that kind.",
                    hint=f"Use a positive {rate_name} (per second) and a {burst_name} of at "
                    "least 1.",
                    id="chat.E013",
                )
            )
    return errors


def check_leases(app_configs=None, **kwargs: Any) -> Messages:
    """A socket's lease is renewed every CHAT_HEARTBEAT seconds: one that lasts less than two
    heartbeats may lapse while its socket is open (a renewal late by a busy loop, or one that
    failed), and its user be announced gone."""
    heartbeat, lease = settings.CHAT_HEARTBEAT, settings.CHAT_PRESENCE_LEASE
    if _positive(heartbeat) and lease >= 2 * heartbeat:
        return []
    return [
        Error(
            f"CHAT_HEARTBEAT is {heartbeat!r} and CHAT_PRESENCE_LEASE is {lease!r}: open sockets' "
            "leases could lapse between renewals, and their users be announced gone.",
            hint="Use a positive CHAT_HEARTBEAT and a CHAT_PRESENCE_LEASE of at least twice it "
            "(30 and 90 seconds by default).",
            id="chat.E014",
        )
    ]


# Limits and intervals that only make sense above zero: at zero or below each turns a
# protection off or the service down without a word (a ticket expired when issued, no socket
# allowed, an alert that never fires).
_POSITIVE_SETTINGS = (
    "CHAT_TICKET_LIFETIME",
    "CHAT_AUTH_TIMEOUT",
    "CHAT_HISTORY_LIMIT",
    "CHAT_TYPING_INTERVAL",
    "CHAT_ABUSE_LIMIT",
    "CHAT_ABUSE_WINDOW",
    "CHAT_MAX_SOCKETS_PER_USER",
    "CHAT_CONNECT_RATE_PER_IP",
    "CHAT_MAX_CONNECTION_AGE",
    "CHAT_PING_INTERVAL",
    "CHAT_PING_TIMEOUT",
    "CHAT_SLOW_CLIENT_TIMEOUT",
    "CHAT_SLOW_CLIENT_MAX_BYTES",
    "CHAT_AUDIT_FLUSH_INTERVAL",
    "CHAT_SECURITY_ALERT_THRESHOLD",
    "CHAT_SECURITY_ALERT_WINDOW",
)


def check_positive_limits(app_configs=None, **kwargs: Any) -> Messages:
    bad = {name: getattr(settings, name) for name in _POSITIVE_SETTINGS}
    bad = {name: value for name, value in bad.items() if not _positive(value)}
    if not bad:
        return []
    return [
        Error(
            f"Limits that must be positive numbers are not: {bad}.",
            hint="Give each a number above zero (docs/deploy.md's environment lists the "
            "defaults), or leave it unset.",
            id="chat.E016",
        )
    ]


def _malformed_rate(rate: Any) -> bool:
    """Not what DRF's throttles can read (its own parser says), or a negative count."""
    try:
        count, _ = SimpleRateThrottle.parse_rate(None, rate)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return True
    return count is not None and count < 0


def check_throttle_rates(app_configs=None, **kwargs: Any) -> Messages:
    """The HTTP limits (CHAT_*_RATE): DRF reads a rate at the first request it limits, and one
    it cannot read fails that request, and every later one, with a 500."""
    rates = settings.REST_FRAMEWORK.get("DEFAULT_THROTTLE_RATES", {})
    malformed = {scope: rate for scope, rate in rates.items() if _malformed_rate(rate)}
    if not malformed:
        return []
    return [
        Error(
            f"Throttle rates that cannot be read: {malformed}: every request they limit fails.",
            hint="Write each CHAT_*_RATE as <requests>/<period>, the period s, min, hour or "
            "day (e.g. 60/min).",
            id="chat.E015",
        )
    ]


def _proxy_headers_trusted() -> list[str]:
    names = []
    if getattr(settings, "SECURE_PROXY_SSL_HEADER", None):
        names.append("SECURE_PROXY_SSL_HEADER")
    names += [
        name
        for name in ("USE_X_FORWARDED_HOST", "USE_X_FORWARDED_PORT")
        if getattr(settings, name, False)
    ]
    return names


def check_trusted_proxies(app_configs=None, **kwargs: Any) -> Messages:
    messages: Messages = []
    proxies = list(settings.CHAT_TRUSTED_PROXIES)
    trusting = _proxy_headers_trusted()
    if trusting and not proxies:
        messages.append(
            Error(
                f"{', '.join(trusting)} trusts headers from a reverse proxy, but "
                "CHAT_TRUSTED_PROXIES is empty.",
                hint=(
                    "Name the proxies in CHAT_TRUSTED_PROXIES (IPs or CIDRs), or unset "
                    "DJANGO_BEHIND_PROXY when clients connect directly."
                ),
                id="chat.E006",
            )
        )
    networks = []
    for entry in proxies:
        try:
            networks.append(proxy_network(str(entry)))
        except ValueError:
            messages.append(
                Error(
                    f"CHAT_TRUSTED_PROXIES entry {entry!r} is not an IP address or CIDR network.",
                    hint="Use addresses such as 127.0.0.1 or networks such as 10.0.0.0/8.",
                    id="chat.E007",
                )
            )
    if any(network.prefixlen == 0 for network in networks):
        messages.append(
            Warning(
                "CHAT_TRUSTED_PROXIES trusts every address: any client can choose its own IP "
                "with X-Forwarded-For (ticket IP binding and per-IP limits are void).",
                hint="List only the reverse proxies' own addresses.",
                id="chat.W002",
            )
        )
    return messages


def check_signing_keys(app_configs=None, **kwargs: Any) -> Messages:
    """Audit and JWT keys in production: long, and the audit key apart from SECRET_KEY."""
    if not _production():
        return []
    errors: Messages = []
    audit_key = settings.CHAT_AUDIT_HMAC_KEY
    if audit_key == settings.SECRET_KEY:
        errors.append(
            Error(
                "CHAT_AUDIT_HMAC_KEY is the SECRET_KEY: whoever holds one can rewrite the audit "
                "chain with the other.",
                hint="Generate a separate random key for CHAT_AUDIT_HMAC_KEY.",
                id="chat.E009",
            )
        )
    if len(audit_key) < MIN_KEY_LENGTH:
        errors.append(
            Error(
                f"CHAT_AUDIT_HMAC_KEY is shorter than {MIN_KEY_LENGTH} characters.",
                hint="Use `python -c 'import secrets; print(secrets.token_urlsafe(48))'`.",
                id="chat.E010",
            )
        )
    jwt_key = settings.SIMPLE_JWT.get("SIGNING_KEY") or ""
    if jwt_key == settings.SECRET_KEY:
        errors.append(
            Warning(
                "The JWT signing key is the SECRET_KEY: rotating one forces rotating the other, "
                "and a leak of either forges tokens.",
                hint="Set JWT_SIGNING_KEY to its own random value.",
                id="chat.W003",
            )
        )
    if len(jwt_key) < MIN_KEY_LENGTH:
        errors.append(
            Error(
                f"The JWT signing key is shorter than {MIN_KEY_LENGTH} characters: HS256 tokens "
                "can be brute-forced offline.",
                hint="Set JWT_SIGNING_KEY to a random value of 32+ bytes.",
                id="chat.E011",
            )
        )
    return errors


def check_channel_layer(app_configs=None, **kwargs: Any) -> Messages:
    """Deploy only: the in-memory layer serves one process (the embedded default still starts)."""
    if not _production():
        return []
    backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
    try:
        in_memory = issubclass(import_string(backend), import_string(IN_MEMORY_LAYER))
    except (ImportError, TypeError):  # not importable, or not a class: not the in-memory layer
        in_memory = False
    if not in_memory:
        return []
    return [
        Warning(
            "The in-memory channel layer is used in production: broadcasts, presence and rate "
            "limits stay inside one process.",
            hint="Set REDIS_URL so that every process shares the channel layer and the limits.",
            id="chat.W001",
        )
    ]


PROXY_HEADERS_MIDDLEWARE = "chatproject.middleware.UntrustedProxyHeadersMiddleware"


def check_proxy_headers_middleware(app_configs=None, **kwargs: Any) -> Messages:
    """Proxy headers must be dropped before any middleware believes them: first in MIDDLEWARE."""
    if settings.MIDDLEWARE[:1] == [PROXY_HEADERS_MIDDLEWARE]:
        return []
    return [
        Error(
            f"{PROXY_HEADERS_MIDDLEWARE} is not the first middleware: X-Forwarded-Proto/Host "
            "from any client would be believed by what runs before it.",
            hint="Put it first in MIDDLEWARE.",
            id="chat.E012",
        )
    ]


def check_https_origins(app_configs=None, **kwargs: Any) -> Messages:
    """Deploy only: production pages are https, so WebSocket origins are too."""
    if not _production():
        return []
    plain = [o for o in settings.CHAT_ALLOWED_ORIGINS if o.lower().startswith("http://")]
    if not plain:
        return []
    return [
        Warning(
            f"CHAT_ALLOWED_ORIGINS allows plain-http origins in production: {', '.join(plain)}.",
            hint="Serve the pages over https and list only https:// origins.",
            id="chat.W004",
        )
    ]


# Run by every management command (serve refuses to start on an error).
CHECKS = [
    check_websocket_guard,
    check_allowed_hosts,
    check_daphne_version,
    check_allowed_origins,
    check_frame_limits,
    check_socket_rates,
    check_leases,
    check_throttle_rates,
    check_positive_limits,
    check_trusted_proxies,
    check_signing_keys,
    check_proxy_headers_middleware,
]
# Run by `check --deploy` only.
DEPLOY_CHECKS = [check_channel_layer, check_https_origins]
