"""Prometheus metrics of this process, and the /metrics view (loopback or bearer token only).

Each daphne process exposes its own numbers; Prometheus scrapes every process directly
(docs/deploy.md). Counters are bumped where the audit trail records the same events, and the
hub counts deliveries once per frame, never once per recipient.
"""

import hmac

from django.conf import settings
from django.http import HttpResponse, HttpResponseForbidden
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from accounts.ip import client_ip_from_request

CONNECTIONS_OPEN = Gauge("chat_connections_open", "WebSocket connections open in this process")
CONNECTION_ATTEMPTS = Counter(
    "chat_connection_attempts_total", "WebSocket connection attempts", ["outcome", "reason"]
)
MESSAGE_EVENTS = Counter("chat_message_events_total", "Message events", ["event", "reason"])
DELIVERIES = Counter("chat_deliveries_total", "Frames written to sockets by the hub")
DELIVERY_LATENCY = Histogram(
    "chat_delivery_latency_seconds",
    "From a message's publication to its fan-out in this process",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ERRORS = Counter("chat_errors_total", "Unexpected errors by component", ["component"])


async def metrics_view(request):
    # Async, as /healthz: the view runs on the event loop and its middleware in a pool thread,
    # never behind a query stuck in the database thread (chatproject/handlers.py).
    if not _allowed(request):
        return HttpResponseForbidden(
            "metrics are only served to loopback or with the metrics token"
        )
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


def _allowed(request) -> bool:
    token = settings.CHAT_METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        return hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode())
    # The resolved client: a public request relayed by a local proxy is not "loopback".
    ip = client_ip_from_request(request)
    return ip in ("127.0.0.1", "::1")
