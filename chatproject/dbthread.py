"""The process's database thread: the sync work of every event loop, in one thread, by queue.

Sync views (chatproject/handlers.py) and the sockets' database calls run here, one at a time,
each on the thread's long-lived connections. asgiref's `sync_to_async` did this job before, at
about twice the CPU a crossing costs here: per call it built a ThreadPoolExecutor future (with
its Condition), a shield, and copied every context variable to the thread and back again
(docs/performance.md). Here a call is a queue entry and a wake-up each way.

What is kept from asgiref:
- the caller's context variables are seen by the call (a copy; what the call sets stays in it);
- a caller cancelled mid-call waits for the call to finish before its cancellation goes on, so
  nothing that follows (a socket's cleanup, a shutdown) overlaps work still running;
- sync code here that waits on async code (`async_to_sync`, as a publish after commit does) has
  it run on the caller's event loop, and a database call that code makes runs in this thread,
  as asgiref does, instead of waiting on itself.
Asgiref's `Local`s set on the loop are not carried over (Django's connections are not such
Locals; nothing here sets one before a call).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Awaitable, Callable
from queue import SimpleQueue
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import SyncToAsync, sync_to_async
from django.db import close_old_connections

P = ParamSpec("P")
R = TypeVar("R")

# Set in every call's context: async code that a call waits on (async_to_sync) inherits it.
_in_call: contextvars.ContextVar[bool] = contextvars.ContextVar("in_database_call", default=False)


class _Call:
    __slots__ = ("context", "finished", "fn", "future", "loop", "over")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> None:
        self.loop, self.fn = loop, fn
        self.future = loop.create_future()
        self.context = contextvars.copy_context()
        self.over = False  # the result has reached the loop
        self.finished: asyncio.Future | None = None  # made for a caller cancelled meanwhile


def _marked(fn: Callable[[], Any]) -> Any:
    _in_call.set(True)
    return fn()


def _deliver(call: _Call, error: BaseException | None, result: Any) -> None:
    call.over = True
    if not call.future.done():  # else its caller was cancelled, and has the `finished` future
        if error is None:
            call.future.set_result(result)
        else:
            call.future.set_exception(error)
    if call.finished is not None and not call.finished.done():
        call.finished.set_result(None)


class DatabaseThread:
    """One thread and its queue; started by the first call, ended at interpreter exit."""

    def __init__(self, name: str = "database") -> None:
        self.name = name
        self._queue: SimpleQueue[_Call | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ident(self) -> int | None:
        return self._thread.ident if self._thread is not None else None

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args, **kwargs)` in the thread, awaited."""
        if _in_call.get():
            # Waited on by a call in progress (async_to_sync): the thread is busy with that call,
            # so this one runs where asgiref runs it, in the waiting thread.
            return await sync_to_async(fn)(*args, **kwargs)
        if self._thread is None:
            self._start()
        loop = asyncio.get_running_loop()
        call = _Call(loop, functools.partial(fn, *args, **kwargs) if args or kwargs else fn)
        self._queue.put(call)
        try:
            return await call.future
        except asyncio.CancelledError:
            if not call.over:
                call.finished = loop.create_future()
                await call.finished
            raise

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
                atexit.register(self.stop)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then end the thread (at exit: it is a daemon thread)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _work(self) -> None:
        get, pid = self._queue.get, os.getpid()
        # Where asgiref's async_to_sync looks for the loop a sync thread serves: async code that
        # a call waits on (a publish on the channel layer) runs on its caller's loop, as it did
        # from asgiref's thread, not on a new loop of its own.
        serving = SyncToAsync.threadlocal
        while (call := get()) is not None:
            serving.main_event_loop, serving.main_event_loop_pid = call.loop, pid
            error = result = None
            try:
                result = call.context.run(_marked, call.fn)
            except BaseException as raised:
                error = raised
            # A caller's loop that is closed has nobody waiting.
            with contextlib.suppress(RuntimeError):
                call.loop.call_soon_threadsafe(_deliver, call, error, result)
            del call, error, result


database_thread = DatabaseThread()


def _unit_of_work(fn: Callable[..., R], args, kwargs) -> R:
    # Django's request_started does this for a request; Channels did it before and after each
    # call. Once, before, is enough: the next call's check is the one after this call.
    close_old_connections()
    return fn(*args, **kwargs)


def database_sync_to_async(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Channels' `database_sync_to_async`, in the database thread."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return await database_thread.run(_unit_of_work, fn, args, kwargs)

    return call
