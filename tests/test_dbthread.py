"""chatproject/dbthread.py: the database thread keeps what asgiref's sync_to_async promised."""

import asyncio
import contextvars
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from django.db import connection

from chatproject.dbthread import DatabaseThread, database_sync_to_async, database_thread
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


async def test_a_cancelled_caller_waits_for_its_call_to_finish(own_thread):
    release, finished = threading.Event(), threading.Event()

    def slow():
        release.wait(WAIT)
        finished.set()

    caller = asyncio.ensure_future(own_thread.run(slow))
    await asyncio.sleep(0.05)
    caller.cancel()
    await asyncio.sleep(0.05)
    assert not caller.done()  # still waiting for the call, which has not finished
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, WAIT)
    assert finished.is_set()


async def test_a_caller_cancelled_before_its_call_starts_still_waits_for_it(own_thread):
    release = threading.Event()
    order = []
    first = asyncio.ensure_future(own_thread.run(release.wait, WAIT))
    second = asyncio.ensure_future(own_thread.run(order.append, "second ran"))
    await asyncio.sleep(0.05)
    second.cancel()
    await asyncio.sleep(0.05)
    assert not second.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(second, WAIT)
    assert order == ["second ran"]
    assert await first is True


def test_a_caller_whose_loop_closed_does_not_stop_the_thread(own_thread):
    release = threading.Event()
    loop = asyncio.new_event_loop()
    pending = loop.create_task(own_thread.run(release.wait, WAIT))
    loop.run_until_complete(asyncio.sleep(0.05))  # the call has started
    pending.cancel()
    loop.close()  # with its caller still waiting
    release.set()
    assert asyncio.run(own_thread.run(lambda: "served")) == "served"


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


def test_stop_finishes_the_queued_calls_first():
    thread = DatabaseThread(name="database-stop")
    done = []

    async def queue_and_stop():
        calls = [asyncio.ensure_future(thread.run(done.append, i)) for i in range(3)]
        await asyncio.sleep(0)  # the calls are queued
        thread.stop(timeout=WAIT)
        return calls

    asyncio.run(queue_and_stop())
    assert done == [0, 1, 2]
    assert thread.ident is None


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
