"""Per-process machinery of the socket side, one set per event loop: hub, writer, audit, state."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chat.audit import AuditBuffer
    from chat.hub import Hub
    from chat.state import MemoryState, RedisState
    from chat.writer import MessageWriter


logger = logging.getLogger("chat.runtime")

# How long a cancelled task may take to clean up before it is cancelled again.
CANCEL_GRACE = 0.5


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


def cancel_and_wait(
    tasks: Iterable[asyncio.Task], *, within: float, grace: float = CANCEL_GRACE
) -> Coroutine[Any, Any, None]:
    """Cancel `tasks` now, and return what waits for them to end: it cancels again each one
    still running after `grace` seconds, and gives up on those left after `within` (logged).

    Now, when called, not once the loop runs the wait: at shutdown a socket must see its
    cancellation before anything else queued (a disconnect event would record 1006, not 1001).

    Once is not enough on Python 3.11: asyncio.wait_for drops a cancellation that arrives
    after its inner future is done but before it resumes (python/cpython#86296, fixed in
    3.12). redis-py sends every command through wait_for when a socket timeout is set (ours
    is), so a hub whose receive lost its cancellation there went on into channels_redis's next
    5-second BZPOPMIN, and the next: each stop waited out its 10-second limit.
    """
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    return _cancelled(tasks, within=within, grace=grace)


async def _cancelled(tasks: list[asyncio.Task], *, within: float, grace: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pending = {task for task in tasks if not task.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            logger.error("tasks still running after cancellation: %s", sorted(map(str, pending)))
            break
        _, pending = await asyncio.wait(pending, timeout=min(grace, left))
        for task in pending:
            task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: each task logs its own failure
