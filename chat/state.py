"""Shared, short-lived state: rate limits, connection caps and presence, global across processes.

Without REDIS_URL there is one process and the state lives in memory. With it, every process
reads and writes the same Redis keys with atomic scripts. Socket entries are leases: a process
renews its sockets' leases (Hub heartbeat), so a crashed process's sockets expire instead of
counting forever. A user whose every lease in a room has lapsed is taken out of its presence by
the next sweep (Hub heartbeat) or join there, as a change of the room's list that someone then
announces: nobody else would, the socket's own close having never run or never reached Redis.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import defaultdict

from django.conf import settings

# How often the memory state forgets rate entries back at rest (MemoryState._sweep).
SWEEP_SECONDS = 60.0


class StateUnavailable(Exception):
    """The shared state (Redis) could not be reached; the caller answers "try again later"."""


def _guarded(method):
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except StateUnavailable:
            raise
        except (OSError, TimeoutError, self._errors) as error:
            raise StateUnavailable(str(error)) from error

    return wrapper


class MemoryState:
    """Single-process state: RedisState's semantics. Socket slots have no leases (no process can
    outlive it); presence entries do, as in Redis, for a socket whose close never ran (its
    cleanup cancelled or failed): it lapses, and the next sweep or join announces its user's
    departure."""

    def __init__(self) -> None:
        # Each rate entry records when it is back at rest (a full bucket, a lapsed window or
        # throttle), the moment Redis lets the same key expire; _sweep drops it then.
        self._buckets: dict[str, tuple[float, float, float]] = {}  # tokens, stamp, at rest
        self._windows: dict[str, tuple[float, int, float]] = {}  # start, count, at rest
        self._throttles: dict[str, float] = {}  # at rest (allowed again)
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        self._user_sockets: dict[int, set[str]] = defaultdict(set)
        # Room -> username -> socket -> lease end (time.monotonic()).
        self._presence: dict[int, dict[str, dict[str, float]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        # Room -> a time before which no lease there lapses: a join or sweep reads the whole
        # room only from then on, about once a lease, not on every call.
        self._lapses: dict[int, float] = {}
        self._versions: dict[int, int] = defaultdict(int)

    async def take_token(self, key: str, rate: float, burst: int) -> bool:
        now = self._now()
        tokens, stamp, _ = self._buckets.get(key, (float(burst), now, now))
        tokens = min(float(burst), tokens + (now - stamp) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        rest = now + (burst - tokens) / rate if rate > 0 else math.inf  # when full again
        self._buckets[key] = (tokens, now, rest)
        return allowed

    async def count_hit(self, key: str, window: float) -> int:
        now = self._now()
        start, count, _ = self._windows.get(key, (now, 0, now))
        if now - start >= window:
            start, count = now, 0
        self._windows[key] = (start, count + 1, start + window)
        return count + 1

    async def throttle(self, key: str, interval: float) -> bool:
        now = self._now()
        if self._throttles.get(key, 0.0) > now:
            return False
        self._throttles[key] = now + interval
        return True

    def _now(self) -> float:
        """The time for a rate call, sweeping first when a sweep is due."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        """Forget the rate entries that are back at rest: a missing entry means the same (a full
        bucket, no window, no throttle). Without it every client IP that ever tried a socket
        (`connect:<ip>`, `rejections:<ip>`) kept an entry for the life of the process."""
        self._next_sweep = now + SWEEP_SECONDS
        self._buckets = {k: v for k, v in self._buckets.items() if v[2] > now}
        self._windows = {k: v for k, v in self._windows.items() if v[2] > now}
        self._throttles = {k: v for k, v in self._throttles.items() if v > now}

    async def socket_open(self, user_id: int, socket_id: str, limit: int) -> bool:
        sockets = self._user_sockets[user_id]
        if len(sockets) >= limit:
            return False
        sockets.add(socket_id)
        return True

    async def socket_close(
        self, user_id: int, socket_id: str, presence: tuple[int, str] | None = None
    ) -> int:
        """Free the socket's slot and, given its (room_id, username), take it out of the room's
        presence. If that was the user's last socket there and someone else still is, the
        departure to announce, by the room's presence version after it; else 0."""
        self._user_sockets[user_id].discard(socket_id)
        if not self._user_sockets[user_id]:
            del self._user_sockets[user_id]
        return self._presence_leave(*presence, socket_id) if presence is not None else 0

    async def presence_join(
        self, room_id: int, username: str, socket_id: str
    ) -> tuple[bool, list[str], int, list[tuple[str, int]]]:
        """Put the socket in the room's presence: (a join to announce: the user's first socket
        there, with someone else there?, the room's users, sorted, the room's presence version
        that list is at, and the departures to announce: (username, version) of the users whose
        leases there had all lapsed, taken out of the list first, as a sweep would).

        The version counts the changes of the room's list of users; every announcement carries
        the version it made, so a socket skips those its list already shows (chat.hub)."""
        now = time.monotonic()
        gone = self._lapse(room_id, now)
        room = self._presence[room_id]
        sockets = room[username]
        first = not sockets
        sockets[socket_id] = end = now + settings.CHAT_PRESENCE_LEASE
        self._lapses[room_id] = min(self._lapses.get(room_id, math.inf), end)
        if first:
            self._versions[room_id] += 1
        others = len(room) > 1
        return first and others, sorted(room), self._versions[room_id], gone if others else []

    def _presence_leave(self, room_id: int, username: str, socket_id: str) -> int:
        room = self._presence.get(room_id, {})
        sockets = room.get(username)
        if not sockets or socket_id not in sockets:
            return 0
        del sockets[socket_id]
        # Its user's sockets whose leases lapsed are gone too: the last live one leaves the room.
        now = time.monotonic()
        for lapsed in [s for s, end in sockets.items() if end <= now]:
            del sockets[lapsed]
        if sockets:
            return 0
        del room[username]
        self._versions[room_id] += 1
        if not room:
            self._forget(room_id)
            return 0
        return self._versions[room_id]

    def _lapse(self, room_id: int, now: float) -> list[tuple[str, int]]:
        """Take out of the room's presence the sockets whose leases lapsed by `now`, and the
        users left with none, each a change of the list: [(username, version)]."""
        if self._lapses.get(room_id, math.inf) > now:
            return []
        room = self._presence[room_id]
        gone, due = [], math.inf
        for username, sockets in list(room.items()):
            for lapsed in [s for s, end in sockets.items() if end <= now]:
                del sockets[lapsed]
            if sockets:
                due = min(due, *sockets.values())
                continue
            del room[username]
            self._versions[room_id] += 1
            gone.append((username, self._versions[room_id]))
        if room:
            self._lapses[room_id] = due
        else:
            self._forget(room_id)
        return gone

    def _forget(self, room_id: int) -> None:
        """An empty room's presence (not its version, which a later join goes on from)."""
        self._presence.pop(room_id, None)
        self._lapses.pop(room_id, None)

    async def sweep(self, room_ids: list[int]) -> list[tuple[int, str, int]]:
        """Take out of these rooms' presence the users whose leases there have all lapsed:
        (room_id, username, version) of each departure to announce, the room still having
        someone in it to hear it. Each departure is returned once, by the first call after it."""
        now = time.monotonic()
        swept = []
        for room_id in room_ids:
            gone = self._lapse(room_id, now)
            if room_id in self._presence:
                swept += [(room_id, username, version) for username, version in gone]
        return swept

    async def renew(self, sockets: list[tuple[int, str, int, str]]) -> None:
        """(user_id, socket_id, room_id, username) for every local socket: the presence leases
        of those still in it (one that left meanwhile is not brought back)."""
        expires = time.monotonic() + settings.CHAT_PRESENCE_LEASE
        for _, socket_id, room_id, username in sockets:
            users = self._presence.get(room_id)
            held = users.get(username) if users is not None else None
            if held is not None and socket_id in held:
                held[socket_id] = expires

    async def close(self) -> None:
        pass


_BUCKET_SCRIPT = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'stamp', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return allowed
"""

_COUNT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return count
"""

_SOCKET_OPEN_SCRIPT = """
local now, expires, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], expires, ARGV[4])
redis.call('PEXPIREAT', KEYS[1], math.ceil(expires * 1000))
return 1
"""

# The room's presence version counts the changes of its list of users (MemoryState.presence_join).
# A counter that is missing (expired a day after its room's last join or leave, or lost) starts
# again from Redis's own clock in microseconds: above any version it gave before, unless the room
# changed more than a million times a second or Redis's clock went back. Redis's clock, not the
# caller's, which may be behind another process's; microseconds, not milliseconds, in which a
# counter lost and started again within one gave a version it had already given.
_VERSION = """
local function version(key, change)
    if redis.call('EXISTS', key) == 0 then
        local t = redis.call('TIME')
        redis.call('SET', key, t[1] .. string.format('%06d', tonumber(t[2])))
    end
    local value = change and redis.call('INCR', key) or tonumber(redis.call('GET', key))
    redis.call('PEXPIRE', key, 86400000)
    return value
end
"""

# A room's users (a sorted set, `pr`) are scored by their latest socket lease there (`pu`, one
# sorted set per user). The sweep takes out of the list the users whose entry lapsed by `now`
# and who have no socket with a live lease left, each a change of the list (its version), and
# returns {username, version, ...}. A user with a live socket stays, scored by it (the entry
# lapsed first only if processes' clocks differ). One script, so each departure is taken, and
# announced, once whichever processes sweep the room at the same moment. The users' socket sets
# are named here, not in KEYS, since only the script knows who lapsed: one Redis server, as the
# deployment runs (docs/deploy.md), not a cluster.
_SWEEP = """
local function sweep(users, changes, user_prefix, now)
    local gone = {}
    for _, user in ipairs(redis.call('ZRANGEBYSCORE', users, '-inf', now)) do
        local sockets = user_prefix .. user
        redis.call('ZREMRANGEBYSCORE', sockets, '-inf', now)
        local last = redis.call('ZRANGE', sockets, -1, -1, 'WITHSCORES')
        if #last > 0 then
            redis.call('ZADD', users, last[2], user)
        else
            redis.call('ZREM', users, user)
            gone[#gone + 1] = user
            gone[#gone + 1] = version(changes, true)
        end
    end
    return gone
end
"""

# KEYS: the user's sockets in the room, the room's users, the room's presence version.
# ARGV: now, lease end, socket, username, the prefix of the room's users' socket sets.
# Returns {announce (1/0), the room's users, the version, the departures}: the users whose leases
# had all lapsed go first, as the sweep takes them ({username, version, ...}, for the joiner to
# announce); then announce if this is the user's first socket there and the list has anyone else
# in it. Departures only with someone else there to hear them.
_PRESENCE_JOIN_SCRIPT = (
    _VERSION
    + _SWEEP
    + """
local now, expires = tonumber(ARGV[1]), tonumber(ARGV[2])
local gone = sweep(KEYS[2], KEYS[3], ARGV[5], now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local first = redis.call('ZCARD', KEYS[1]) == 0
redis.call('ZADD', KEYS[1], expires, ARGV[3])
redis.call('ZADD', KEYS[2], expires, ARGV[4])
redis.call('PEXPIREAT', KEYS[1], math.ceil(expires * 1000))
redis.call('PEXPIREAT', KEYS[2], math.ceil(expires * 1000))
local others = redis.call('ZCARD', KEYS[2]) > 1
local at = version(KEYS[3], first)
if not others then gone = {} end
return {first and others and 1 or 0, redis.call('ZRANGE', KEYS[2], 0, -1), at, gone}
"""
)

# KEYS: the room's users, its presence version. ARGV: now, the prefix of the users' socket sets.
# Returns the departures (as the join's) if the list still has anyone in it to hear them.
_PRESENCE_SWEEP_SCRIPT = (
    _VERSION
    + _SWEEP
    + """
local gone = sweep(KEYS[1], KEYS[2], ARGV[2], tonumber(ARGV[1]))
if redis.call('ZCARD', KEYS[1]) == 0 then return {} end
return gone
"""
)

# KEYS: the user's sockets; then, if the socket was in a room's presence, the user's sockets in
# the room, the room's users and its presence version. ARGV: socket, now, username. Returns the
# version of the departure if the user left the room and the list still has anyone in it, else 0.
# A user with another socket there stays, scored by its lease, so that the sweep takes them once
# it lapses (a socket on a process that died) rather than when this one's would have.
_SOCKET_CLOSE_SCRIPT = (
    _VERSION
    + """
local now = tonumber(ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[1])
if #KEYS < 4 then return 0 end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if #last > 0 then
    redis.call('ZADD', KEYS[3], 'XX', last[2], ARGV[3])
    return 0
end
redis.call('ZREM', KEYS[3], ARGV[3])
local at = version(KEYS[4], true)
if redis.call('ZCARD', KEYS[3]) == 0 then return 0 end
return at
"""
)

# A heartbeat's refresh of one local socket's leases. KEYS: the user's sockets, the user's sockets
# in the room, the room's users. ARGV: socket, lease end, username. Only a socket still in its
# sets is refreshed (one that closed, or that a sweep took once its lease lapsed, is not brought
# back); its user is put back in the room's list if the entry went missing there otherwise (the
# list's key expired early, its expiry set by a process whose clock is behind).
_RENEW_SCRIPT = """
local expires = tonumber(ARGV[2])
local at = math.ceil(expires * 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('ZADD', KEYS[1], expires, ARGV[1])
    redis.call('PEXPIREAT', KEYS[1], at)
end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    redis.call('ZADD', KEYS[2], expires, ARGV[1])
    redis.call('ZADD', KEYS[3], 'GT', expires, ARGV[3])
    redis.call('PEXPIREAT', KEYS[2], at)
    redis.call('PEXPIREAT', KEYS[3], at)
end
return 0
"""


class _TokenPipeline:
    """The token-bucket calls of one turn of the event loop, sent to Redis in one pipeline.

    Every message a socket sends takes a token (the per-user rate limit, global across
    processes), and each call was an EVALSHA round trip of its own: about 70 µs of the server's
    CPU in redis-py. Calls made in the same turn (the frames of one read, of several sockets)
    queue until its end (`call_soon`), then go in one pipeline, in the order they were made;
    Redis runs them one after another, as it ran the separate calls. Each caller gets its own
    answer or error; a pipeline that fails as a whole fails every call in it.
    """

    def __init__(self, redis, script) -> None:
        from redis.exceptions import NoScriptError

        self._redis, self._script, self._no_script = redis, script, NoScriptError
        self._queues: dict[asyncio.AbstractEventLoop, list] = {}
        self._running: set[asyncio.Task] = set()

    async def take(self, key: str, rate: float, burst: int) -> int:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = []
            loop.call_soon(self._send, loop)
        future = loop.create_future()
        queue.append((key, rate, burst, future))
        return await future

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._queues.pop(loop)
        task = loop.create_task(self._run(batch))
        self._running.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(functools.partial(self._settle, batch))

    def _settle(self, batch: list, task: asyncio.Task) -> None:
        """No caller waits forever: a run cancelled (shutdown) or stopped before it answered
        everyone fails the calls it left unanswered."""
        self._running.discard(task)
        for *_, future in batch:
            if not future.done():
                future.set_exception(StateUnavailable("the token pipeline did not answer"))

    async def _run(self, batch: list) -> None:
        now = time.time()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, rate, burst, _ in batch:
                    pipe.evalsha(self._script.sha, 1, key, rate, burst, now)
                results = await pipe.execute(raise_on_error=False)
        except Exception as error:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (key, rate, burst, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            try:
                if isinstance(result, self._no_script):
                    # Redis lost its scripts (a restart, SCRIPT FLUSH): the script loads it.
                    result = await self._script(keys=[key], args=[rate, burst, now])
            except Exception as error:
                result = error
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class RedisState:
    """State in Redis, shared by every process of the deployment."""

    def __init__(self, url: str, prefix: str, max_connections: int) -> None:
        from redis import asyncio as aioredis
        from redis.exceptions import RedisError

        self._errors = RedisError

        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._prefix = prefix
        self._tokens = _TokenPipeline(self._redis, self._redis.register_script(_BUCKET_SCRIPT))
        self._count_hit = self._redis.register_script(_COUNT_SCRIPT)
        self._socket_open = self._redis.register_script(_SOCKET_OPEN_SCRIPT)
        self._presence_join = self._redis.register_script(_PRESENCE_JOIN_SCRIPT)
        self._socket_close = self._redis.register_script(_SOCKET_CLOSE_SCRIPT)
        self._renew = self._redis.register_script(_RENEW_SCRIPT)
        self._sweep = self._redis.register_script(_PRESENCE_SWEEP_SCRIPT)

    def _key(self, *parts: object) -> str:
        return ":".join([self._prefix, *map(str, parts)])

    def _presence_keys(self, room_id: int, username: str) -> list[str]:
        """The user's sockets in the room, the room's users, the room's presence version."""
        return [
            self._key("pu", room_id, username),
            self._key("pr", room_id),
            self._key("pv", room_id),
        ]

    @_guarded
    async def take_token(self, key: str, rate: float, burst: int) -> bool:
        return bool(await self._tokens.take(self._key("tb", key), rate, burst))

    @_guarded
    async def count_hit(self, key: str, window: float) -> int:
        return int(await self._count_hit(keys=[self._key("win", key)], args=[int(window * 1000)]))

    @_guarded
    async def throttle(self, key: str, interval: float) -> bool:
        # At least 1 ms: PX 0 is an error in Redis.
        return bool(
            await self._redis.set(
                self._key("thr", key), 1, px=max(1, int(interval * 1000)), nx=True
            )
        )

    @_guarded
    async def socket_open(self, user_id: int, socket_id: str, limit: int) -> bool:
        now = time.time()
        return bool(
            await self._socket_open(
                keys=[self._key("us", user_id)],
                args=[now, now + settings.CHAT_PRESENCE_LEASE, limit, socket_id],
            )
        )

    @_guarded
    async def socket_close(
        self, user_id: int, socket_id: str, presence: tuple[int, str] | None = None
    ) -> int:
        keys, args = [self._key("us", user_id)], [socket_id, time.time()]
        if presence is not None:
            room_id, username = presence
            keys += self._presence_keys(room_id, username)
            args.append(username)
        return int(await self._socket_close(keys=keys, args=args))

    @_guarded
    async def presence_join(
        self, room_id: int, username: str, socket_id: str
    ) -> tuple[bool, list[str], int, list[tuple[str, int]]]:
        now = time.time()
        announce, online, version, gone = await self._presence_join(
            keys=self._presence_keys(room_id, username),
            args=[
                now,
                now + settings.CHAT_PRESENCE_LEASE,
                socket_id,
                username,
                self._key("pu", room_id, ""),
            ],
        )
        online = sorted(name.decode() for name in online)
        return bool(announce), online, int(version), _departures(gone)

    @_guarded
    async def sweep(self, room_ids: list[int]) -> list[tuple[int, str, int]]:
        if not room_ids:
            return []
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            for room_id in room_ids:
                keys = [self._key("pr", room_id), self._key("pv", room_id)]
                args = [now, self._key("pu", room_id, "")]
                # Queued on the pipeline, as renew's: one round trip for all the rooms.
                await self._sweep(keys=keys, args=args, client=pipe)
            swept = await pipe.execute()
        return [
            (room_id, username, version)
            for room_id, gone in zip(room_ids, swept, strict=True)
            for username, version in _departures(gone)
        ]

    @_guarded
    async def renew(self, sockets: list[tuple[int, str, int, str]]) -> None:
        expires = time.time() + settings.CHAT_PRESENCE_LEASE
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id, socket_id, room_id, username in sockets:
                # The user's sockets, in the room too, and the room's users (not its version).
                keys = [self._key("us", user_id), *self._presence_keys(room_id, username)[:2]]
                # Queued on the pipeline (which loads the script first if Redis lacks it).
                await self._renew(keys=keys, args=[socket_id, expires, username], client=pipe)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)


def _departures(flat: list) -> list[tuple[str, int]]:
    """A script's {username, version, ...} as [(username, version)]."""
    return [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def make_state() -> MemoryState | RedisState:
    if settings.REDIS_URL:
        return RedisState(
            settings.REDIS_URL, settings.CHAT_REDIS_PREFIX, settings.REDIS_MAX_CONNECTIONS
        )
    return MemoryState()
