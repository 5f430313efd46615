"""The shared state's socket and presence calls, in memory and in Redis, with one meaning.

A handshake joins the room's presence and reads who is there in one call, and a closing socket
leaves its slot and the presence in one: on Redis each is one round trip (docs/performance.md,
"At scale"). The memory state, used without REDIS_URL, must answer the same.
"""

import asyncio
import secrets
import time
from types import SimpleNamespace

import pytest
import redis

from chat import state as state_module
from chat.state import _BUCKET_SCRIPT, MemoryState, RedisState, StateUnavailable
from tests.chat.helpers import LAPSED, state_clock_ahead
from tests.services import reachable_redis_url, redis_clear_prefix


@pytest.fixture
async def redis_state():
    url, prefix = reachable_redis_url(), f"test-state-{secrets.token_hex(4)}"
    shared = RedisState(url, prefix, max_connections=4)
    yield shared
    await shared.close()
    redis_clear_prefix(url, prefix)


@pytest.fixture(params=["memory", "redis"])
def state(request):
    if request.param == "memory":
        return MemoryState()
    return request.getfixturevalue("redis_state")


async def test_joining_tells_whether_to_announce_who_is_there_and_at_which_version(state):
    # bob alone: nobody to tell.
    announce, online, first, _ = await state.presence_join(7, "bob", "b1")
    assert (announce, online) == (False, ["bob"])
    assert await state.presence_join(7, "alice", "a1") == (True, ["alice", "bob"], first + 1, [])
    # A second socket of alice's: nothing to announce, the list names her once, no change.
    assert await state.presence_join(7, "alice", "a2") == (False, ["alice", "bob"], first + 1, [])
    # Another room is another list, with its own count of changes.
    assert (await state.presence_join(8, "carol", "c1"))[:2] == (False, ["carol"])


async def test_closing_leaves_the_presence_on_the_users_last_socket_only(state):
    for socket_id in ("a1", "a2"):
        assert await state.socket_open(1, socket_id, limit=2)
        await state.presence_join(7, "alice", socket_id)
    _, _, joined, _ = await state.presence_join(7, "bob", "b1")

    assert await state.socket_close(1, "a1", (7, "alice")) == 0
    assert await state.presence_join(7, "bob", "b2") == (False, ["alice", "bob"], joined, [])
    # Her last socket: a departure bob hears, the next change.
    assert await state.socket_close(1, "a2", (7, "alice")) == joined + 1
    assert await state.presence_join(7, "bob", "b3") == (False, ["bob"], joined + 1, [])
    # Closing it again changes nothing and announces nothing.
    assert await state.socket_close(1, "a2", (7, "alice")) == 0


async def test_a_departure_nobody_hears_still_counts_as_a_change(state):
    await state.presence_join(7, "alice", "a1")
    _, _, joined, _ = await state.presence_join(7, "bob", "b1")
    assert await state.socket_close(2, "b1", (7, "bob")) == joined + 1  # alice hears it
    assert await state.socket_close(1, "a1", (7, "alice")) == 0  # nobody is left to
    # The list changed all the same: an announcement made before it is older than this list.
    assert await state.presence_join(7, "carol", "c1") == (False, ["carol"], joined + 3, [])


async def test_closing_frees_the_socket_slot_with_or_without_presence(state):
    assert await state.socket_open(1, "a1", limit=1)
    assert not await state.socket_open(1, "a2", limit=1)
    # A socket that never joined its room (refused after counting) leaves its slot only.
    assert await state.socket_close(1, "a1") == 0
    assert await state.socket_open(1, "a2", limit=1)
    await state.presence_join(7, "alice", "a2")
    await state.socket_close(1, "a2", (7, "alice"))
    assert await state.socket_open(1, "a3", limit=1)


async def test_a_socket_not_in_the_presence_does_not_make_its_user_leave(state):
    assert await state.socket_open(1, "a1", limit=2)
    assert await state.socket_open(1, "a2", limit=2)
    await state.presence_join(7, "alice", "a1")
    # a2 was counted and is closing as if it had joined: alice is still there through a1.
    assert await state.socket_close(1, "a2", (7, "alice")) == 0
    assert (await state.presence_join(7, "bob", "b1"))[1] == ["alice", "bob"]


async def test_a_late_heartbeat_does_not_bring_back_a_user_who_left(state):
    await state.presence_join(7, "bob", "b1")
    listed = [(1, "a1", 7, "alice")]  # a heartbeat's list, taken while alice was there
    await state.presence_join(7, "alice", "a1")
    await state.socket_close(1, "a1", (7, "alice"))
    await state.renew(listed)
    assert (await state.presence_join(7, "carol", "c1"))[1] == ["bob", "carol"]


# --- leases that lapse: a socket whose close never ran or never reached the state -----------------


async def test_a_user_whose_leases_all_lapsed_is_swept_once_as_a_change(state, monkeypatch):
    await state.presence_join(7, "alice", "a1")  # her process dies: a1 is never closed
    _, _, joined, _ = await state.presence_join(7, "bob", "b1")
    state_clock_ahead(monkeypatch, LAPSED)
    await state.renew([(2, "b1", 7, "bob")])  # bob's process lives on
    assert await state.sweep([7, 8]) == [(7, "alice", joined + 1)]
    # Once, whoever sweeps next; and a join after it is a change after it.
    assert await state.sweep([7]) == []
    assert await state.presence_join(7, "alice", "a2") == (True, ["alice", "bob"], joined + 2, [])


async def test_a_sweep_takes_only_the_users_left_without_a_live_socket(state, monkeypatch):
    await state.presence_join(7, "alice", "a1")  # on a process that dies
    await state.presence_join(7, "bob", "b1")  # on that process too
    _, _, joined, _ = await state.presence_join(7, "bob", "b2")  # and on one that lives
    state_clock_ahead(monkeypatch, LAPSED)
    await state.renew([(2, "b2", 7, "bob")])
    assert await state.sweep([7]) == [(7, "alice", joined + 1)]
    assert await state.presence_join(7, "carol", "c1") == (True, ["bob", "carol"], joined + 2, [])
    # b2 is bob's last socket there: its close is his departure.
    assert await state.socket_close(2, "b2", (7, "bob")) == joined + 3


async def test_a_user_who_closed_elsewhere_is_swept_once_the_socket_left_behind_lapses(
    state, monkeypatch
):
    await state.presence_join(7, "alice", "a1")  # her process dies
    _, _, joined, _ = await state.presence_join(7, "bob", "b1")
    state_clock_ahead(monkeypatch, LAPSED - 30)
    await state.renew([(2, "b1", 7, "bob")])
    # She reconnects to another process and leaves again, while a1's lease still holds her.
    await state.presence_join(7, "alice", "a2")
    assert await state.socket_close(1, "a2", (7, "alice")) == 0
    # a1's lease lapses (a2's would have 60 s later): nothing is left to hold her there.
    state_clock_ahead(monkeypatch, LAPSED)
    assert await state.sweep([7]) == [(7, "alice", joined + 1)]


async def test_a_join_takes_out_the_users_whose_leases_lapsed_and_returns_their_departures(
    state, monkeypatch
):
    await state.presence_join(7, "alice", "a1")
    _, _, joined, _ = await state.presence_join(7, "bob", "b1")
    state_clock_ahead(monkeypatch, LAPSED)
    await state.renew([(2, "b1", 7, "bob")])
    # carol's list has no alice, and alice's departure is a change before carol's join: for
    # carol's socket to announce to the others, its own hello being past it.
    assert await state.presence_join(7, "carol", "c1") == (
        True,
        ["bob", "carol"],
        joined + 2,
        [("alice", joined + 1)],
    )
    assert await state.sweep([7]) == []


async def test_a_sweep_that_empties_a_room_announces_nothing_but_counts_the_change(
    state, monkeypatch
):
    _, _, joined, _ = await state.presence_join(7, "alice", "a1")
    state_clock_ahead(monkeypatch, LAPSED)
    assert await state.sweep([7]) == []  # nobody there to hear it
    assert await state.presence_join(7, "bob", "b1") == (False, ["bob"], joined + 2, [])


async def test_processes_sweeping_a_room_at_once_take_each_departure_once(redis_state, monkeypatch):
    other = RedisState(reachable_redis_url(), redis_state._prefix, max_connections=4)
    try:
        await redis_state.presence_join(7, "alice", "a1")
        await redis_state.presence_join(7, "carol", "c1")
        _, _, joined, _ = await redis_state.presence_join(7, "bob", "b1")
        state_clock_ahead(monkeypatch, LAPSED)
        await other.renew([(2, "b1", 7, "bob")])
        swept = await asyncio.gather(*(s.sweep([7]) for s in [redis_state, other] * 3))
        departures = sorted(departure for one in swept for departure in one)
        assert departures == [(7, "alice", joined + 1), (7, "carol", joined + 2)]
    finally:
        await other.close()


async def lapse(redis_state, room_id: int, username: str) -> None:
    """The user's entry in the room's list lapsed, not their socket's lease: the entry was last
    written by a process whose clock is behind that of the socket's."""
    await redis_state._redis.zadd(redis_state._key("pr", room_id), {username: 1.0})


async def test_someone_whose_room_entry_lapsed_before_their_socket_is_still_there(redis_state):
    await redis_state.presence_join(7, "alice", "a1")
    await redis_state.presence_join(7, "bob", "b1")
    await lapse(redis_state, 7, "alice")
    assert await redis_state.socket_close(2, "b1", (7, "bob")) > 0  # alice hears bob leave
    await lapse(redis_state, 7, "alice")
    assert await redis_state.sweep([7]) == []  # nor is she swept: a1's lease is live
    await lapse(redis_state, 7, "alice")
    announce, online, _, gone = await redis_state.presence_join(7, "carol", "c1")
    assert (announce, online, gone) == (True, ["alice", "carol"], [])  # and carol come


async def test_a_lost_version_counter_starts_above_the_versions_it_gave(redis_state):
    before = (await redis_state.presence_join(7, "alice", "a1"))[2]
    await redis_state._redis.delete(redis_state._key("pv", 7))  # expired, evicted, flushed
    assert (await redis_state.presence_join(7, "bob", "b1"))[2] > before


async def test_a_lost_version_counter_starts_again_from_redis_s_clock(redis_state, monkeypatch):
    before = (await redis_state.presence_join(7, "alice", "a1"))[2]
    await redis_state._redis.delete(redis_state._key("pv", 7))
    # The next change comes from a process whose clock is an hour behind the first one's.
    behind = time.time() - 3600
    monkeypatch.setattr(state_module, "time", SimpleNamespace(time=lambda: behind))
    assert (await redis_state.presence_join(7, "bob", "b1"))[2] > before


async def test_a_heartbeat_puts_back_a_live_user_whose_room_entry_was_pruned(redis_state):
    await redis_state.presence_join(7, "alice", "a1")
    # Her entry went missing from the room's list (its key expired early: its expiry was set
    # by a process whose clock is behind).
    await redis_state._redis.zrem(redis_state._key("pr", 7), "alice")
    await redis_state.renew([(1, "a1", 7, "alice")])
    assert (await redis_state.presence_join(7, "bob", "b1"))[1] == ["alice", "bob"]


# --- token buckets: one pipeline per turn of the event loop (Redis) -------------------------------


def record_batches(monkeypatch, tokens) -> list[int]:
    sizes: list[int] = []
    run = type(tokens)._run

    async def recording(self, batch):
        sizes.append(len(batch))
        await run(self, batch)

    monkeypatch.setattr(type(tokens), "_run", recording)
    return sizes


async def test_tokens_taken_in_one_turn_go_in_one_pipeline_in_order(redis_state, monkeypatch):
    sizes = record_batches(monkeypatch, redis_state._tokens)
    calls = [redis_state.take_token(f"k{i % 2}", rate=0.001, burst=3) for i in range(10)]
    answers = await asyncio.gather(*calls)
    assert sizes == [10]
    # Per key, the first three (its burst) in call order get a token, as separate calls did.
    assert answers == [True] * 6 + [False] * 4
    assert await redis_state.take_token("k2", rate=0.001, burst=3)
    assert sizes == [10, 1]


async def test_a_script_redis_has_not_got_is_loaded_and_its_calls_answered(redis_state):
    # A script text Redis has never seen: every call in the pipeline gets NOSCRIPT.
    script = redis_state._redis.register_script(f"{_BUCKET_SCRIPT}-- {secrets.token_hex(8)}")
    redis_state._tokens._script = script
    answers = await asyncio.gather(*(redis_state.take_token("k", 0.001, 2) for _ in range(3)))
    assert answers == [True, True, False]
    assert (await redis_state._redis.script_exists(script.sha)) == [True]


async def test_a_pipeline_that_fails_fails_every_call_in_it():
    unreachable = RedisState("redis://127.0.0.1:9/0", "test-state-down", max_connections=4)
    try:
        results = await asyncio.gather(
            *(unreachable.take_token(f"k{i}", 1.0, 1) for i in range(3)), return_exceptions=True
        )
    finally:
        await unreachable.close()
    assert [type(r) for r in results] == [StateUnavailable] * 3


async def test_a_cancelled_caller_leaves_the_others_their_answers(redis_state):
    first = asyncio.ensure_future(redis_state.take_token("k", 0.001, 2))
    second = asyncio.ensure_future(redis_state.take_token("k", 0.001, 2))
    await asyncio.sleep(0)  # both queued
    first.cancel()
    assert await second is True
    assert first.cancelled()


async def test_a_call_whose_script_reload_fails_fails_alone(redis_state):
    script = redis_state._redis.register_script(f"{_BUCKET_SCRIPT}-- {secrets.token_hex(8)}")

    class LosesOneKey:
        sha = script.sha

        async def __call__(self, keys, args):
            if keys[0].endswith(":bad"):
                raise redis.ConnectionError("connection lost")
            return await script(keys=keys, args=args)

    redis_state._tokens._script = LosesOneKey()
    results = await asyncio.gather(
        *(redis_state.take_token(key, 0.001, 5) for key in ("a", "bad", "b")),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [bool, StateUnavailable, bool]
    assert results[0] is results[2] is True


async def test_a_pipeline_stopped_before_it_ran_fails_its_calls_instead_of_hanging(redis_state):
    calls = [asyncio.ensure_future(redis_state.take_token("k", 1.0, 5)) for _ in range(2)]
    for _ in range(3):  # the calls queue, then the turn ends and the pipeline is made
        await asyncio.sleep(0)
    assert redis_state._tokens._running
    for run in list(redis_state._tokens._running):
        run.cancel()  # as at shutdown, before its first step
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert [type(r) for r in results] == [StateUnavailable, StateUnavailable]


# --- the memory state forgets rate entries back at rest, as Redis lets their keys expire --------


async def test_the_memory_state_forgets_rate_entries_once_they_are_back_at_rest(monkeypatch):
    """Every client IP that tries a socket makes a `connect:<ip>` bucket and perhaps a
    `rejections:<ip>` window: kept forever, they grew with every address ever seen."""
    from chat import state as state_module

    clock = [1000.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: clock[0])
    memory = MemoryState()
    for n in range(100):
        assert await memory.take_token(f"connect:10.0.0.{n}", rate=1.0, burst=5)
        assert await memory.count_hit(f"rejections:10.0.0.{n}", window=30.0) == 1
        assert await memory.throttle(f"typing:1:{n}", interval=3.0)
    # One bucket emptied: not at rest until it has refilled (5 tokens at 1/s).
    for _ in range(5):
        assert await memory.take_token("connect:10.9.9.9", rate=1.0, burst=5)
    assert not await memory.take_token("connect:10.9.9.9", rate=1.0, burst=5)

    clock[0] += state_module.SWEEP_SECONDS - 0.5  # before the first sweep: all still there
    await memory.throttle("typing:1:x", interval=3.0)
    assert (len(memory._buckets), len(memory._windows)) == (101, 100)

    clock[0] += 1.0  # past it: what came back to rest is gone, the recent throttle stays
    assert await memory.take_token("connect:10.9.9.9", rate=1.0, burst=5)  # refilled
    assert (len(memory._buckets), len(memory._windows)) == (1, 0)
    assert set(memory._throttles) == {"typing:1:x"}
    assert not await memory.throttle("typing:1:x", interval=3.0)  # still throttled


@pytest.mark.parametrize("seed", range(5))
async def test_forgetting_entries_at_rest_changes_no_answer(monkeypatch, seed):
    """Random calls and clock steps, on a state that sweeps and one that never does: a swept
    entry must answer as the kept one would (a bucket swept before it is full would hand out
    tokens it has not earned back; a window swept early would restart its count)."""
    import random

    from chat import state as state_module

    rng = random.Random(seed)
    clock = [1000.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: clock[0])
    sweeping, keeping = MemoryState(), MemoryState()
    keeping._sweep = lambda now: None
    swept = 0
    for _ in range(3000):
        key = f"k{rng.randrange(3)}"
        kind = rng.randrange(3)
        answers = []
        for memory in (sweeping, keeping):
            if kind == 0:
                answers.append(await memory.take_token(key, rate=0.01, burst=3))
            elif kind == 1:
                answers.append(await memory.count_hit(key, window=100.0))
            else:
                answers.append(await memory.throttle(key, interval=20.0))
        assert answers[0] == answers[1]
        before = len(sweeping._buckets) + len(sweeping._windows) + len(sweeping._throttles)
        clock[0] += rng.choice([0.0, 0.0, 0.5, 3.0, 17.0, 61.0])
        await sweeping.throttle("tick", interval=0.0)  # a call, so a due sweep runs
        after = len(sweeping._buckets) + len(sweeping._windows) + len(sweeping._throttles)
        swept += max(0, before - after)
    assert swept > 20  # the sweep did drop entries, and nothing answered differently
