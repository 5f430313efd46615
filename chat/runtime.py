"""Per-process machinery of the socket side, one set per event loop: hub, writer, audit, state."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chat.audit import AuditBuffer
    from chat.hub import Hub
    from chat.state import MemoryState, RedisState
    from chat.writer import MessageWriter


logger = logging.getLogger("chat.runtime")


class Runtime:
    def __init__(self) -> None:
        from chat.audit import AuditBuffer
        from chat.hub import Hub
        from chat.state import make_state
        from chat.writer import MessageWriter

        self.state: MemoryState | RedisState = make_state()
        self.audit: AuditBuffer = AuditBuffer()
        self.hub: Hub = Hub(self)
        self.writer: MessageWriter = MessageWriter()

    async def shutdown(self) -> None:
        """Stop background work and write everything still queued (clean shutdown loses nothing;
        audit rows the database will not take go to the spool, chat/spool.py)."""
        await self.hub.stop()
        await self.writer.drain()
        await self.audit.flush()
        self.audit.spool()
        await self.state.close()


_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = (
    weakref.WeakKeyDictionary()
)


def get_runtime() -> Runtime:
    loop = asyncio.get_running_loop()
    runtime = _runtimes.get(loop)
    if runtime is None:
        runtime = _runtimes[loop] = Runtime()
    return runtime


async def shutdown_runtime() -> None:
    runtime = _runtimes.pop(asyncio.get_running_loop(), None)
    if runtime is not None:
        await runtime.shutdown()


async def cancel_and_wait(tasks: Iterable[asyncio.Task], *, within: float, grace: float) -> None:
    """Cancel `tasks` (those not already being cancelled) and wait for them to end, cancelling
    again each one still running every `grace` seconds; give up after `within` (logged).

    Again, because Python 3.11 can lose a cancellation: asyncio.wait_for drops one that arrives
    after its inner future is done but before it resumes (python/cpython#86296, fixed in 3.12).
    redis-py sends each command through wait_for when a socket timeout is set (ours is), so the
    hub's receive lost Hub.stop's cancellation there and waited on in channels_redis's next
    5-second blocking pop, and the next: each stop took its whole 10-second limit.
    """
    tasks = list(tasks)
    for task in tasks:
        if not task.cancelling():
            task.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pending = {task for task in tasks if not task.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            names = sorted(task.get_name() for task in pending)
            logger.error("%d tasks still running after cancellation: %s", len(names), names[:5])
            break
        _, pending = await asyncio.wait(pending, timeout=min(grace, left))
        for task in pending:
            task.cancel()
    for task in tasks:
        # Retrieved here, and logged: once stopping, nothing else would report it.
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            logger.error("task %s failed while stopping", task.get_name(), exc_info=error)
