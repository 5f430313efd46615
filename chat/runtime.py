"""Per-process machinery of the socket side, one set per event loop: hub, writer, audit, state."""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chat.audit import AuditBuffer
    from chat.hub import Hub
    from chat.state import MemoryState, RedisState
    from chat.writer import MessageWriter


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
