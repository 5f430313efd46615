"""Coalesces the messages that sockets of this process send into batched transactions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from django.db import DataError, IntegrityError

from chat import broadcast, frames, metrics, services
from chat.services import SendItem, SendResult
from chatproject.dbthread import database_sync_to_async

logger = logging.getLogger("chat.writer")

MAX_BATCH = 500
# The writer's task, which a shutdown lets finish (chatproject.server.finish_event_loop).
TASK_NAME = "chat-message-writer"

Reply = Callable[[str], Awaitable[None]]


class MessageWriter:
    """Natural batching: while one batch is being written, the next one fills up.

    A lone message is written at once (no added latency); under load each transaction carries
    every message that arrived during the previous one, so throughput grows with demand. After
    the commit the writer answers each sender (ack or error) and only then publishes the batch,
    so a sender always sees its ack before the broadcast of its own message.
    """

    def __init__(self) -> None:
        self._queue: list[tuple[SendItem, Reply, asyncio.Future[SendResult | None]]] = []
        self._task: asyncio.Task | None = None

    def submit(self, item: SendItem, reply: Reply) -> asyncio.Future[SendResult | None]:
        """Queue a message; `reply` gets its ack or error frame; the future is done once it has.

        The caller need not wait: a socket keeps several messages in flight, so a fast sender's
        messages share transactions too. If the socket goes away meanwhile the message is still
        written (its client_id makes a re-send after reconnect harmless).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SendResult | None] = loop.create_future()
        self._queue.append((item, reply, future))
        if self._task is None:
            self._task = loop.create_task(self._run(), name=TASK_NAME)
        return future

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._write(batch)
        finally:
            self._task = None

    async def _write(self, batch) -> None:
        items = [item for item, _, _ in batch]
        try:
            results, publications = await database_sync_to_async(services.message_store_many)(items)
        except (DataError, IntegrityError):
            if len(batch) == 1:
                await self._fail(batch)
                return
            # The database refused something in this batch: find it by storing the messages
            # one by one, in order, so one sender's bad data cannot cost the others theirs.
            logger.warning("batch of %d messages refused; storing them one by one", len(batch))
            for entry in batch:
                await self._write([entry])
            return
        except Exception:
            await self._fail(batch)
            return
        for (item, reply, future), result in zip(batch, results, strict=True):
            if result.error:
                text = frames.error(result.error, result.detail, client_id=item.client_id)
            else:
                text = frames.ack(item.client_id, result.seq)
            await _answer(reply, text)
            future.set_result(result)
        for group, event in publications:
            try:
                await broadcast.apublish(group, event)
            except Exception:
                # Stored is what matters: sockets fill the gap from the database.
                logger.exception("publishing to %s failed", group)

    async def _fail(self, batch) -> None:
        metrics.ERRORS.labels("writer").inc()
        logger.exception("storing %d messages failed", len(batch))
        for item, reply, future in batch:
            await _answer(
                reply,
                frames.error(
                    "unavailable", "message not stored; send it again", client_id=item.client_id
                ),
            )
            future.set_result(None)

    async def drain(self) -> None:
        """Until everything submitted is written, answered and published."""
        while self._task is not None:
            await asyncio.shield(self._task)


async def _answer(reply: Reply, text: str) -> None:
    try:
        await reply(text)
    except Exception:
        logger.debug("could not answer a sender", exc_info=True)
