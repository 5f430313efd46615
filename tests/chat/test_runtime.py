"""Stopping the per-process machinery: cancelled tasks end, even when a cancellation is lost."""

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from chat import writer as writer_module
from chat.runtime import cancel_and_wait, get_runtime
from chat.services import SendResult
from chatproject import server

# Each test's guard against a hang; the stops under test take a grace period or two.
HANG = 20
# Python 3.11's asyncio.wait_for can drop a cancellation (python/cpython#86296); 3.12's cannot.
LOSES_CANCELLATIONS = sys.version_info < (3, 12)


def _wait_then_block(gate: asyncio.Future, went_on: asyncio.Event):
    """What channels_redis's receive did on Python 3.11 when the hub was stopped: redis-py's
    command send (an asyncio.wait_for) dropped the cancellation, and the blocking pop that
    followed went on waiting."""

    async def wait_then_block(*args) -> dict:
        await asyncio.wait_for(gate, timeout=HANG)
        went_on.set()
        await asyncio.Event().wait()
        return {}

    return wait_then_block


async def _arm(gate: asyncio.Future) -> None:
    """Leave a task waiting on `gate` in wait_for in the state where it drops the next
    cancellation: wait_for has its result, and the task's wake-up is scheduled but not run."""
    gate.set_result(None)
    await asyncio.sleep(0)


async def _losing_its_next_cancellation() -> tuple[asyncio.Task, asyncio.Event]:
    gate, went_on = asyncio.get_running_loop().create_future(), asyncio.Event()
    task = asyncio.create_task(_wait_then_block(gate, went_on)())
    await asyncio.sleep(0)  # the task waits in wait_for
    await _arm(gate)
    return task, went_on


async def test_a_task_that_loses_its_cancellation_is_cancelled_again():
    task, went_on = await _losing_its_next_cancellation()
    async with asyncio.timeout(HANG) as stopping:
        await cancel_and_wait([task], within=HANG, grace=0.05)  # cancels before it yields
    assert not stopping.expired()
    assert task.cancelled()
    # The case arose: the first cancellation was dropped, and the task went on past wait_for.
    assert went_on.is_set() is LOSES_CANCELLATIONS


async def test_a_task_that_ignores_its_first_cancellation_is_cancelled_again():
    """The lost cancellation, on any Python: the task carries on as if it had none."""

    async def ignores_one() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await asyncio.Event().wait()

    task = asyncio.create_task(ignores_one())
    await asyncio.sleep(0)
    async with asyncio.timeout(HANG) as stopping:
        await cancel_and_wait([task], within=HANG, grace=0.05)
    assert not stopping.expired()
    assert task.cancelled()


@pytest.mark.parametrize("cleaning_up", [False, True], ids=["running", "already_cleaning_up"])
async def test_a_task_given_its_grace_finishes_its_cleanup(cleaning_up):
    """Also when its cleanup has begun: finish_event_loop cancels the sockets itself, before
    the loop runs anything else, and a second cancellation at once would cut that short."""
    cleaned = asyncio.Event()

    async def cleans_up_slowly() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)
            cleaned.set()
            raise

    task = asyncio.create_task(cleans_up_slowly())
    await asyncio.sleep(0)
    if cleaning_up:
        task.cancel()
        await asyncio.sleep(0)
    await cancel_and_wait([task], within=HANG, grace=5)
    assert cleaned.is_set()
    assert task.cancelled()


async def test_a_task_that_will_not_end_is_left_and_logged(caplog):
    holding = True

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if not holding:
                    raise

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="chat.runtime"):
        await cancel_and_wait([task], within=0.2, grace=0.05)
    assert not task.done()
    assert "stubborn" in caplog.text
    holding = False
    await cancel_and_wait([task], within=HANG, grace=0.05)
    assert task.cancelled()


async def test_a_task_that_failed_is_logged_and_its_error_retrieved(caplog):
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails(), name="failing")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="chat.runtime"):
        await cancel_and_wait([task], within=HANG, grace=0.05)
    assert task._log_traceback is False  # asyncio will not report it as never retrieved
    assert "task failing failed while stopping" in caplog.text
    assert "RuntimeError: boom" in caplog.text


async def test_hub_stop_ends_a_receive_that_lost_its_cancellation(monkeypatch):
    """On Redis, each consumer test's teardown waited out the old stop's 10-second limit for
    this, and so did a server's shutdown."""
    hub = get_runtime().hub
    gate, went_on = asyncio.get_running_loop().create_future(), asyncio.Event()
    monkeypatch.setattr(hub.layer, "receive", _wait_then_block(gate, went_on))
    await hub._start()
    await asyncio.sleep(0)  # the hub's receive waits in wait_for
    receiver = hub._receiver
    await _arm(gate)
    # Well under the 10 s the old stop waited before cancelling a second time.
    async with asyncio.timeout(5) as stopping:
        await hub.stop()
    assert not stopping.expired()  # (the old stop also swallowed the timeout's cancellation)
    assert receiver.cancelled()
    assert went_on.is_set() is LOSES_CANCELLATIONS
    assert hub._receiver is None


def test_shutdown_finishes_a_task_that_lost_its_cancellation(monkeypatch):
    """finish_event_loop (run when daphne's reactor stops) gathered the cancelled tasks: one
    that lost its cancellation kept the process from ever exiting."""
    monkeypatch.setattr(server, "SHUTDOWN_CANCEL_GRACE", 0.05)
    outcome: dict = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        gate, went_on = loop.create_future(), asyncio.Event()
        task = loop.create_task(_wait_then_block(gate, went_on)())
        loop.run_until_complete(asyncio.sleep(0))  # the task waits in wait_for
        # Its wait ends in the loop turn that cancels it: wait_for returns instead of raising.
        loop.call_soon(gate.set_result, None)
        server.finish_event_loop()
        outcome.update(
            cancelled=task.cancelled(), went_on=went_on.is_set(), closed=loop.is_closed()
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=HANG)
    assert not thread.is_alive(), "finish_event_loop did not return"
    assert outcome == {"cancelled": True, "went_on": LOSES_CANCELLATIONS, "closed": True}


@pytest.mark.django_db(transaction=True)
def test_shutdown_lets_the_message_writer_answer_publish_and_finish_its_queue(monkeypatch):
    """At SIGTERM a batch being written commits anyway (the database thread runs a started
    call to its end): cancelled, the writer left it unanswered and unpublished, and the batch
    queued behind it unwritten."""
    monkeypatch.setattr(server, "SHUTDOWN_CANCEL_GRACE", 0.05)
    started, committed, published, replies = threading.Event(), [], [], []

    def store_many(items):  # in the database thread: the transaction
        started.set()
        time.sleep(0.3)
        committed.extend(item.client_id for item in items)
        results = [SendResult(seq=n) for n, _ in enumerate(items, 1)]
        return results, [("room-1", {"type": "hub.messages", "room": 1, "items": []})]

    async def apublish(group, event):
        published.append(group)

    monkeypatch.setattr(writer_module.services, "message_store_many", store_many)
    monkeypatch.setattr(writer_module.broadcast, "apublish", apublish)

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def reply(text):
            replies.append(json.loads(text))

        async def one_then_another():
            runtime = get_runtime()
            runtime.writer.submit(SimpleNamespace(client_id="m1"), reply)
            await asyncio.to_thread(started.wait, HANG)
            runtime.writer.submit(SimpleNamespace(client_id="m2"), reply)  # the next batch

        loop.run_until_complete(one_then_another())
        server.finish_event_loop()  # what `manage.py serve` runs at SIGTERM

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=HANG)
    assert not thread.is_alive(), "finish_event_loop did not return"
    assert committed == ["m1", "m2"]
    assert [(r["type"], r["client_id"]) for r in replies] == [("ack", "m1"), ("ack", "m2")]
    assert published == ["room-1", "room-1"]
