"""The process's database thread: the sync work of every event loop, in one thread, by queue.

Sync views (chatproject/handlers.py) and the sockets' database calls run here, one at a time,
each on the thread's long-lived connections. asgiref's `sync_to_async` did this job before, at
about twice the CPU a crossing costs here: per call it built a ThreadPoolExecutor future (with
its Condition) and a shield, and copied the context variables to the thread and back again
(docs/performance.md). Here a call is a queue entry and a wake-up each way.

What asgiref's thread-sensitive calls did, and these do too:
- the call sees the caller's context variables, asgiref `Local`s included; what it sets in them
  stays in its copy (asgiref copied it back to the caller);
- a cancelled caller is released at once; its call is dropped if it has not started, and
  otherwise runs to its end;
- async code that a call waits on (`async_to_sync`, as a publish after commit does) runs on the
  caller's event loop, and a database call from there, or from any async code that sync code
  waits on, runs in the waiting thread instead of waiting on it.
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

from asgiref.sync import AsyncToSync, SyncToAsync, sync_to_async

# asgiref's own first step in its thread: `Local`s set by the caller become this thread's.
from asgiref.sync import _restore_context as _adopt_locals
from django.db import connections

P = ParamSpec("P")
R = TypeVar("R")

# The context variable behind `AsyncToSync.executors` (an asgiref `Local`), read directly: on a
# call from the event loop the Local holds nothing, and reading it then raised and caught an
# AttributeError, 3 µs a call (0.05 µs this way).
_executors_var = AsyncToSync.executors._storage._data
if not isinstance(_executors_var, contextvars.ContextVar):  # asgiref is pinned to 3.13.x
    raise ImportError("asgiref's Local no longer keeps its values in a ContextVar")


def _sync_caller_waiting() -> bool:
    """Whether sync code in some thread waits on this async code (`async_to_sync`)."""
    storage = _executors_var.get(None)
    return (
        storage is not None
        and storage.thread_id == threading.get_ident()  # as the Local checks
        and storage.data.get("current") is not None
    )


class _Call:
    __slots__ = ("abandoned", "context", "fn", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> None:
        self.loop, self.fn = loop, fn
        self.future = loop.create_future()
        self.context = contextvars.copy_context()
        self.abandoned = False  # its caller was cancelled


def _in_thread(call: _Call) -> Any:
    _adopt_locals(call.context)
    return call.fn()


def _answer(call: _Call, error: BaseException | None, result: Any) -> None:
    """From the thread: the call's outcome, to its caller's loop."""
    with contextlib.suppress(RuntimeError):  # a caller's loop that is closed has nobody waiting
        call.loop.call_soon_threadsafe(_deliver, call, error, result)


def _deliver(call: _Call, error: BaseException | None, result: Any) -> None:
    if not call.future.done():  # else its caller was cancelled
        if error is None:
            call.future.set_result(result)
        else:
            call.future.set_exception(error)


class DatabaseThread:
    """One thread and its queue; started by the first call, ended at interpreter exit."""

    def __init__(self, name: str = "database") -> None:
        self.name = name
        self._queue: SimpleQueue[_Call | None] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ident(self) -> int | None:
        return self._thread.ident if self._thread is not None else None

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args, **kwargs)` in the thread, awaited."""
        if _sync_caller_waiting():
            # Sync code waits on this (async_to_sync): the thread it waits in, this one or
            # another, takes the call meanwhile, as asgiref does. Queued here, the call would
            # wait on its own caller, or beside its transaction and on its locks.
            return await sync_to_async(fn)(*args, **kwargs)
        queue = self._queue or self._start()
        loop = asyncio.get_running_loop()
        call = _Call(loop, functools.partial(fn, *args, **kwargs) if args or kwargs else fn)
        queue.put(call)
        try:
            return await call.future
        except asyncio.CancelledError:
            call.abandoned = True
            raise

    def _start(self) -> SimpleQueue:
        with self._lock:
            if self._queue is None:
                queue: SimpleQueue[_Call | None] = SimpleQueue()
                self._thread = threading.Thread(
                    target=self._work, args=(queue,), name=self.name, daemon=True
                )
                self._thread.start()
                self._queue = queue
            return self._queue

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, close the thread's connections, end it (at exit, as a daemon
        thread would not be waited for)."""
        with self._lock:
            queue, thread = self._queue, self._thread
            self._queue = self._thread = None  # the next call starts a new thread, queue and all
        if queue is not None and thread is not None:
            queue.put(None)
            thread.join(timeout)

    def _forget(self) -> None:
        # In a forked child: the parent's thread did not come along, and its lock may be held.
        self._queue = self._thread = None
        self._lock = threading.Lock()

    @staticmethod
    def _work(queue: SimpleQueue) -> None:
        get, pid = queue.get, os.getpid()
        # Where asgiref's async_to_sync looks for the loop a sync thread serves: async code that
        # a call waits on (a publish on the channel layer) runs on its caller's loop, as it did
        # from asgiref's thread, not on a new loop of its own.
        serving = SyncToAsync.threadlocal
        while (call := get()) is not None:
            if call.abandoned:
                continue
            serving.main_event_loop, serving.main_event_loop_pid = call.loop, pid
            error = result = None
            try:
                result = call.context.run(_in_thread, call)
            except StopIteration as raised:
                # A future cannot hold StopIteration (set_exception refuses it): as asyncio does.
                error = RuntimeError(f"{call.fn!r} raised StopIteration")
                error.__cause__ = raised
            except BaseException as raised:
                error = raised
            _answer(call, error, result)
            del call, error, result
        connections.close_all()  # SQLite checkpoints its WAL as its last connection closes
        # Calls queued after the stop, by a caller that raced it: answered, not left waiting.
        stopped = RuntimeError("the database thread has stopped")
        while not queue.empty():
            if (late := queue.get()) is not None:
                _answer(late, stopped, None)


database_thread = DatabaseThread()
atexit.register(database_thread.stop)
os.register_at_fork(after_in_child=database_thread._forget)


def _unit_of_work(fn: Callable[..., R], args, kwargs) -> R:
    """Django's close_old_connections() around `fn`, as Channels' database_sync_to_async, but:

    - before the call only, for a connection that is old or broken: the next call's check is
      this one's check after. After it too for one a bug left in a transaction, which would
      hold its locks until then.
    - never for a connection in `atomic`, which only sync code waiting on this call (run in its
      thread, above) can hold: Django's check closes such a connection, and the transaction
      with it (Channels' did).
    """
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()
    try:
        return fn(*args, **kwargs)
    finally:
        for connection in connections.all(initialized_only=True):
            if (
                not connection.in_atomic_block
                and connection.connection is not None
                and not connection.get_autocommit()
            ):
                connection.close()


def database_sync_to_async(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Channels' `database_sync_to_async`, in the database thread."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return await database_thread.run(_unit_of_work, fn, args, kwargs)

    return call
