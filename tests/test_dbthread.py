"""chatproject/dbthread.py: the database thread keeps what asgiref's sync_to_async promised."""

import asyncio
import contextlib
import contextvars
import threading
import time

import pytest
from asgiref.local import Local
from asgiref.sync import AsyncToSync, async_to_sync
from django.contrib.auth import get_user_model
from django.db import connection, connections, transaction

from chatproject.dbthread import (
    DatabaseThread,
    _sync_caller_waiting,
    database_sync_to_async,
    database_thread,
)
from tests.conftest import WAIT

flavour: contextvars.ContextVar[str] = contextvars.ContextVar("flavour", default="plain")


@pytest.fixture
def own_thread():
    thread = DatabaseThread(name="database-test")
    yield thread
    thread.stop(timeout=WAIT)


async def test_calls_run_one_after_another_in_one_thread_off_the_loop(own_thread):
    running, overlapped = [], []

    def work(i):
        overlapped.append(bool(running))
        running.append(i)
        time.sleep(0.01)
        running.remove(i)
        return threading.get_ident()

    idents = await asyncio.gather(*(own_thread.run(work, i) for i in range(5)))
    assert set(idents) == {own_thread.ident}
    assert own_thread.ident != threading.get_ident()
    assert overlapped == [False] * 5


async def test_results_and_errors_reach_their_callers(own_thread):
    class Refused(Exception):
        pass

    def refuse(reason):
        raise Refused(reason)

    assert await own_thread.run(divmod, 7, 2) == (3, 1)
    assert await own_thread.run(lambda *, x: x * 2, x=21) == 42
    with pytest.raises(Refused, match="no access"):
        await own_thread.run(refuse, "no access")
    # The thread outlives the error.
    assert await own_thread.run(lambda: "still here") == "still here"


async def test_a_call_sees_the_callers_context_variables_and_changes_only_its_copy(own_thread):
    flavour.set("salted")

    def change():
        seen = flavour.get()
        flavour.set("sweet")
        return seen

    assert await own_thread.run(change) == "salted"
    assert flavour.get() == "salted"
    assert await own_thread.run(flavour.get) == "salted"  # nothing left over from the last call


async def test_a_call_sees_the_callers_asgiref_locals(own_thread):
    """Django keeps the active translation, time zone and caches in asgiref Locals; asgiref's
    thread-sensitive calls carried them to the thread, and so does this."""
    local = Local()
    local.flavour = "salted"
    assert await own_thread.run(getattr, local, "flavour", None) == "salted"


async def test_a_cancelled_caller_is_released_while_its_call_runs_to_its_end(own_thread):
    """As asgiref's: the caller goes on at once; the call, started, is not interrupted."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(WAIT)
        finished.set()

    caller = asyncio.ensure_future(own_thread.run(slow))
    assert await asyncio.to_thread(started.wait, WAIT)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not finished.is_set()
    release.set()
    assert await own_thread.run(finished.is_set) is True  # the next call comes after it


async def test_a_call_whose_caller_was_cancelled_before_it_started_is_dropped(own_thread):
    started, release = threading.Event(), threading.Event()
    ran = []

    def first():
        started.set()
        release.wait(WAIT)

    holder = asyncio.ensure_future(own_thread.run(first))
    assert await asyncio.to_thread(started.wait, WAIT)
    dropped = asyncio.ensure_future(own_thread.run(ran.append, "dropped"))
    await asyncio.sleep(0)  # queued behind the first
    dropped.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dropped
    release.set()
    await holder
    await own_thread.run(ran.append, "next")
    assert ran == ["next"]


def test_a_caller_whose_loop_closed_does_not_stop_the_thread(own_thread):
    started, release = threading.Event(), threading.Event()

    def held():
        started.set()
        release.wait(WAIT)

    loop = asyncio.new_event_loop()
    waiting = loop.create_task(own_thread.run(held))
    loop.run_until_complete(asyncio.to_thread(started.wait, WAIT))
    loop.close()  # with its caller still waiting
    assert not waiting.done()
    release.set()  # the answer finds the loop closed
    assert asyncio.run(asyncio.wait_for(own_thread.run(lambda: "served"), WAIT)) == "served"


async def test_async_code_a_call_waits_on_runs_on_the_callers_loop(own_thread):
    """A publish after commit (chat.broadcast: async_to_sync(group_send)) must reach the channel
    layer of the loop that serves the sockets, not a new loop made for the occasion."""

    async def where():
        return asyncio.get_running_loop()

    assert await own_thread.run(async_to_sync(where)) is asyncio.get_running_loop()


async def test_async_code_a_call_waits_on_gets_the_database_in_that_same_thread(own_thread):
    """A call that waits on async code (async_to_sync) which asks for the thread again: the
    inner call runs in the waiting thread, as asgiref's thread-sensitive calls do, and does not
    wait on itself."""

    async def inner():
        return await own_thread.run(threading.get_ident)

    def outer():
        return threading.get_ident(), async_to_sync(inner)()

    outer_ident, inner_ident = await asyncio.wait_for(own_thread.run(outer), WAIT)
    assert outer_ident == inner_ident == own_thread.ident


def test_a_database_call_from_async_code_that_sync_code_waits_on_runs_in_the_waiting_thread(
    own_thread,
):
    """Sync code holding a transaction, waiting on async code that writes, would otherwise wait
    on its own lock (asgiref: thread-sensitive calls go back to the waiting sync thread)."""

    async def inner():
        return await own_thread.run(threading.get_ident)

    assert async_to_sync(inner)() == threading.get_ident()
    assert own_thread.ident is None  # never needed


def test_the_waiting_check_reads_what_asgiref_keeps_in_its_local():
    """`_sync_caller_waiting` reads asgiref's context variable directly (the Local's getattr
    costs 3 µs when empty): it must agree with the Local, in a sync caller's async code, in a
    plain loop, and in a thread that merely inherited the context."""

    def by_local():
        return getattr(AsyncToSync.executors, "current", None) is not None

    async def both():
        return _sync_caller_waiting(), by_local()

    assert async_to_sync(both)() == (True, True)
    assert asyncio.run(both()) == (False, False)

    async def in_a_copied_context():
        seen = []
        context = contextvars.copy_context()  # holds the waiting sync caller's executor
        thread = threading.Thread(
            target=lambda: seen.append(context.run(lambda: (_sync_caller_waiting(), by_local())))
        )
        thread.start()
        thread.join()
        return seen[0]

    assert async_to_sync(in_a_copied_context)() == (False, False)


def test_stop_finishes_the_queued_calls_first():
    thread = DatabaseThread(name="database-stop")
    done = []

    async def queue_and_stop():
        calls = [asyncio.ensure_future(thread.run(done.append, i)) for i in range(3)]
        await asyncio.sleep(0)  # the calls are queued
        worker = thread._thread
        thread.stop(timeout=WAIT)
        return worker, calls

    worker, _ = asyncio.run(queue_and_stop())
    assert done == [0, 1, 2]
    assert not worker.is_alive()


async def test_a_call_queued_behind_the_stop_is_answered_not_left_waiting(own_thread):
    started, release = threading.Event(), threading.Event()

    def held():
        started.set()
        release.wait(WAIT)

    holder = asyncio.ensure_future(own_thread.run(held))
    assert await asyncio.to_thread(started.wait, WAIT)
    own_thread._queue.put(None)  # stop()'s own step, raced by the call below
    late = asyncio.ensure_future(own_thread.run(lambda: "too late"))
    await asyncio.sleep(0)
    release.set()
    await holder
    with pytest.raises(RuntimeError, match="stopped"):
        await asyncio.wait_for(late, WAIT)


async def test_stop_iteration_reaches_the_caller_as_an_error(own_thread):
    with pytest.raises(RuntimeError, match="StopIteration"):
        await asyncio.wait_for(own_thread.run(next, iter(())), WAIT)


@pytest.mark.django_db(transaction=True)
def test_stop_closes_the_threads_connections():
    thread = DatabaseThread(name="database-close")

    def open_one():
        connection.ensure_connection()
        return connections["default"]  # this thread's wrapper

    wrapper = asyncio.run(thread.run(open_one))
    assert wrapper.connection is not None
    thread.stop(timeout=WAIT)
    assert wrapper.connection is None


@pytest.mark.django_db(transaction=True)
async def test_database_calls_keep_their_connection_until_it_is_obsolete():
    def current():
        connection.ensure_connection()
        return connection.connection  # the driver's connection, kept alive: ids may be reused

    def expire():
        connection.close_at = time.monotonic() - 1  # past CONN_MAX_AGE

    read = database_sync_to_async(current)
    first = await read()
    assert await read() is first  # persistent, as Channels' calls were (CONN_MAX_AGE)
    await database_thread.run(expire)
    assert await read() is not first  # closed by the check before the next call, and replaced
    assert await database_thread.run(threading.get_ident) == database_thread.ident


@pytest.mark.django_db(transaction=True)
async def test_a_call_that_leaves_a_transaction_open_has_its_connection_closed_at_once():
    """It would hold its locks (the audit chain's head, a room's row) until the next call."""

    def leave_open():
        connection.set_autocommit(False)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    await database_sync_to_async(leave_open)()
    assert await database_thread.run(lambda: connection.connection is None)


class Abort(Exception):
    pass


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fails", [False, True], ids=["commits", "rolls-back"])
def test_a_write_from_async_code_a_transaction_waits_on_is_part_of_it(fails):
    """The write runs in the waiting thread, inside its transaction, which the unit of work's
    connection checks leave alone (Django's check would close the connection, and with it the
    transaction: Channels' database_sync_to_async did)."""
    users = get_user_model().objects
    write = database_sync_to_async(lambda: users.create(username="inner"))

    async def inner():
        await write()

    with contextlib.suppress(Abort), transaction.atomic():
        users.create(username="outer")
        async_to_sync(inner)()
        if fails:
            raise Abort
    names = set(users.values_list("username", flat=True))
    assert names == (set() if fails else {"outer", "inner"})
