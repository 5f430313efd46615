"""/healthz: is this process able to serve? Database and channel layer, 200 or 503."""

import asyncio
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from channels.layers import get_channel_layer
from django.db import connection
from django.http import JsonResponse

PROBE_TIMEOUT = 2.0  # seconds; a probe that takes longer is a failed check

# The database probe's own thread: never the thread every other database call of the process
# shares (a query stuck there must not hold the health check), nor the default pool (a probe
# stuck on a dead database would keep a worker of it). One probe at a time: checks that come
# while it runs share its answer; once it has run past its time limit, they fail at once.
_PROBE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="healthz-db")
_running: Future | None = None
_running_since = 0.0


class PreviousProbeRunning(Exception):
    """The last database probe has not come back: the database is not answering."""


def _select_one() -> None:
    """SELECT 1 on a connection of this thread's own, closed after (checks hold none)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()


async def _database() -> None:
    global _running, _running_since
    if _running is None or _running.done():
        _running, _running_since = _PROBE_THREAD.submit(_select_one), time.monotonic()
    elif time.monotonic() - _running_since >= PROBE_TIMEOUT:
        raise PreviousProbeRunning
    await asyncio.wrap_future(_running)


async def _channel_layer() -> None:
    # A channel of the probe's own, and not a process-specific ("!") one: channels_redis lets
    # one receive at a time wait on those, and the hub's waits for room events without end.
    layer = get_channel_layer()
    channel = f"health.{uuid.uuid4().hex}"
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
    database, channel_layer = await asyncio.gather(_check(_database), _check(_channel_layer))
    checks = {"database": database, "channel_layer": channel_layer}
    healthy = all(c["ok"] for c in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status=200 if healthy else 503,
        headers={"Cache-Control": "no-store"},
    )
