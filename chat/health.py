"""/healthz: is this process able to serve? Database and channel layer, 200 or 503."""

import asyncio
import time

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.http import JsonResponse

PROBE_TIMEOUT = 2.0  # seconds; a probe that takes longer is a failed check


def _database() -> None:
    """SELECT 1 from a pool thread on a connection of its own, closed after.

    Not in the thread every other database call shares: a query stuck there must not hold the
    health check, and a database that stopped answering must time the probe out, not queue it.
    """
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()


async def _channel_layer() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel(prefix="health")
    await layer.send(channel, {"type": "health.ping"})
    await layer.receive(channel)


async def _check(probe) -> dict:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), timeout=PROBE_TIMEOUT)
    except Exception as error:  # a health check reports every failure, never raises
        return {"ok": False, "error": type(error).__name__}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}


async def healthz(request):
    checks = {
        "database": await _check(sync_to_async(_database, thread_sensitive=False)),
        "channel_layer": await _check(_channel_layer),
    }
    healthy = all(c["ok"] for c in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status=200 if healthy else 503,
        headers={"Cache-Control": "no-store"},
    )
