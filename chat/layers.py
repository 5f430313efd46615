"""The channel layers: Channels' in-memory layer without a sweep per message (the embedded
default), and channels_redis's layer receiving in batches (at scale)."""

from __future__ import annotations

import itertools
import time
from collections import deque

from channels.layers import InMemoryChannelLayer as StockInMemoryChannelLayer
from channels_redis.core import RedisChannelLayer as StockRedisChannelLayer


class InMemoryChannelLayer(StockInMemoryChannelLayer):
    """Channels' in-memory layer whose expiry sweep runs at most once per `clean_interval`.

    The stock layer calls `_clean_expired` on every `receive` and every `group_send`, and that
    walks every queued message and every membership of every group: O(rooms + sockets) of work
    per published message. Under many small rooms it was 15% of the server's busy time (py-spy,
    `python -m bench --scenario persist --targets chat --profile`). Messages expire after
    `expiry` (30 s here) and memberships after `group_expiry` (a day), so sweeping once a second
    changes when a stale entry goes by at most that second; what is delivered does not change.
    """

    clean_interval = 1.0

    def __init__(self, *args, clean_interval: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if clean_interval is not None:
            self.clean_interval = clean_interval
        self._next_clean = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now < self._next_clean:
            return
        self._next_clean = now + self.clean_interval
        super()._clean_expired()


class RedisChannelLayer(StockRedisChannelLayer):
    """channels_redis's layer, which takes every message already waiting on a channel in one
    round trip.

    The stock layer spends four round trips on each message it receives (restore the backup
    queue, BZPOPMIN, back the message up, remove the backup), and with several processes every
    process receives every message of its rooms: per message, that receive was most of what a
    second process added (docs/performance.md, two processes). Here one script pops up to
    `receive_batch` waiting messages and keeps them in the channel's backup; they are handed out
    one per `receive_single`, in the order the stock layer would give them. Only an empty channel
    costs a blocking BZPOPMIN, as before.

    It batches process-specific ("!") channels, such as the hub's: one process receives them,
    one receive at a time (the stock `receive` holds a lock around `receive_single` for them).
    A plain channel may have receivers in several processes, and keeps the stock receive.

    The backup keeps what the stock layer's keeps safe: a pop whose answer never came (the
    receive was cancelled, or the connection failed, after the script ran) leaves its messages
    in the backup, and the next pop puts them back in the channel first. Each batch is numbered;
    the script knows a lost batch from the last one received by that number. A received batch
    stays in this process until handed out, across cancellations of `receive`. The backup
    expires with the layer's messages (`expiry`, at least 60 s): the stock one never does.
    """

    receive_batch = 100

    # KEYS: the channel, its backup, the backup's batch number. ARGV: the number of the last
    # batch received, this batch's number, how many to pop, seconds the backup may outlive us.
    _POP_BATCH = """
        local kept = redis.call('GET', KEYS[3])
        if kept and kept ~= ARGV[1] then
            local lost = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
            for i = #lost, 1, -2 do
                redis.call('ZADD', KEYS[1], lost[i], lost[i - 1])
            end
        end
        redis.call('DEL', KEYS[2], KEYS[3])
        local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[3]))
        if #popped > 0 then
            for i = 1, #popped, 2 do
                redis.call('ZADD', KEYS[2], popped[i + 1], popped[i])
            end
            redis.call('EXPIRE', KEYS[2], ARGV[4])
            redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[4])
        end
        return popped
    """

    def __init__(self, *args, receive_batch: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if receive_batch is not None:
            self.receive_batch = receive_batch
        self._received: dict[str, deque[bytes]] = {}
        self._batch_numbers = itertools.count(1)
        self._last_batch: dict[str, str] = {}  # per channel key: the last batch received

    async def receive_single(self, channel):
        if "!" not in channel:
            # A plain channel may have receivers in several processes and on several hosts:
            # the stock receive, one message at a time. Only /healthz uses one.
            return await super().receive_single(channel)
        assert self.require_valid_channel_name(channel, receive=True), "Channel name invalid"
        assert channel.endswith("!")
        index = self.consistent_hash(channel)
        key = self.prefix + channel
        received = self._received.get(key)
        while not received:
            # No await between the answer and this assignment: a received batch is kept.
            received = self._received[key] = deque(await self._pop(index, key))
        message = self.deserialize(received.popleft())
        if "__asgi_channel__" in message:
            channel = message.pop("__asgi_channel__")
        return channel, message

    async def _pop(self, index: int, key: str) -> list[bytes]:
        """The messages waiting on `key` (at most receive_batch); else the first to come, or
        nothing once the blocking pop's timeout passes."""
        connection = self.connection(index)
        backup = self._backup_channel_name(key)
        number = str(next(self._batch_numbers))
        popped = await connection.eval(
            self._POP_BATCH,
            3,
            key,
            backup,
            backup + "#",
            self._last_batch.get(key, ""),
            number,
            self.receive_batch,
            max(int(self.expiry), 60),
        )
        if popped:
            self._last_batch[key] = number
            return popped[::2]
        # Nothing waiting (and no backup left): block until a message comes. As with the stock
        # layer, a cancellation that lands after Redis popped it loses it; once here, it is ours.
        result = await connection.bzpopmin(key, timeout=self.brpop_timeout)
        return [] if result is None else [result[1]]

    async def flush(self) -> None:
        self._received.clear()
        self._last_batch.clear()
        await super().flush()
