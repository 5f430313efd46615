"""chatproject.server.Inbox behaves as the asyncio.Queue daphne gives each connection, for the
two calls daphne makes (put_nowait from the protocol, get from the application's receive)."""

import asyncio
import sys

import pytest

from chatproject.server import Inbox

KINDS = [pytest.param(asyncio.Queue, id="asyncio.Queue"), pytest.param(Inbox, id="Inbox")]


@pytest.mark.parametrize("kind", KINDS)
async def test_first_in_first_out(kind):
    inbox = kind()
    for i in range(5):
        inbox.put_nowait(i)
    assert [await inbox.get() for _ in range(5)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
async def test_get_waits_for_a_put(kind):
    inbox = kind()
    getter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    inbox.put_nowait("connect")
    assert await asyncio.wait_for(getter, 1) == "connect"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancelled_get_loses_nothing(kind):
    inbox = kind()
    getter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    inbox.put_nowait("disconnect")
    assert await asyncio.wait_for(inbox.get(), 1) == "disconnect"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_getter_woken_then_cancelled_hands_the_item_on(kind):
    inbox = kind()
    first = asyncio.ensure_future(inbox.get())
    second = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("only")  # wakes the first...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 1) == "only"
    assert first.cancelled()


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_getters_each_get_one_item_in_order(kind):
    inbox = kind()
    getters = [asyncio.ensure_future(inbox.get()) for _ in range(3)]
    await asyncio.sleep(0)
    for item in "abc":
        inbox.put_nowait(item)
    assert await asyncio.wait_for(asyncio.gather(*getters), 1) == ["a", "b", "c"]


def test_an_idle_inbox_is_a_tenth_of_a_queue():
    queue = asyncio.Queue()
    deques = [queue._queue, queue._getters, queue._putters, queue._finished._waiters]
    assert sum(sys.getsizeof(d) for d in deques) > 2500  # one 64-slot block each, items or not
    inbox = Inbox()
    assert sys.getsizeof(inbox) < 100
    assert not hasattr(inbox, "__dict__")
