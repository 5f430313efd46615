"""The shared state's socket and presence calls, in memory and in Redis, with one meaning.

A handshake joins the room's presence and reads who is there in one call, and a closing socket
leaves its slot and the presence in one: on Redis each is one round trip (docs/performance.md,
"At scale"). The memory state, used without REDIS_URL, must answer the same.
"""

import os
import secrets

import pytest
import redis
from django.conf import settings

from chat.state import MemoryState, RedisState


def _redis_url() -> str:
    url = settings.REDIS_URL or os.environ.get("CHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        # A missing service skips this locally; in CI it fails (.ci/run).
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {url} is not reachable: {error}")
        pytest.skip(f"Redis at {url} is not reachable: {error}")
    return url


@pytest.fixture(params=["memory", "redis"])
async def state(request):
    if request.param == "memory":
        yield MemoryState()
        return
    url, prefix = _redis_url(), f"test-state-{secrets.token_hex(4)}"
    shared = RedisState(url, prefix, max_connections=4)
    yield shared
    await shared.close()
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


async def test_joining_tells_whether_first_and_who_is_there(state):
    assert await state.presence_join(7, "bob", "b1") == (True, ["bob"])
    assert await state.presence_join(7, "alice", "a1") == (True, ["alice", "bob"])
    # A second socket of alice's: not her first, and the list names her once.
    assert await state.presence_join(7, "alice", "a2") == (False, ["alice", "bob"])
    # Another room is another list.
    assert await state.presence_join(8, "carol", "c1") == (True, ["carol"])


async def test_closing_leaves_the_presence_on_the_users_last_socket_only(state):
    for socket_id in ("a1", "a2"):
        assert await state.socket_open(1, socket_id, limit=2)
        await state.presence_join(7, "alice", socket_id)
    await state.presence_join(7, "bob", "b1")

    assert await state.socket_close(1, "a1", (7, "alice")) is False
    assert (await state.presence_join(7, "bob", "b2"))[1] == ["alice", "bob"]
    assert await state.socket_close(1, "a2", (7, "alice")) is True
    assert (await state.presence_join(7, "bob", "b3"))[1] == ["bob"]
    # Closing it again changes nothing and announces nothing.
    assert await state.socket_close(1, "a2", (7, "alice")) is False


async def test_the_last_user_to_leave_has_nobody_to_tell(state):
    await state.presence_join(7, "alice", "a1")
    await state.presence_join(7, "bob", "b1")
    assert await state.socket_close(2, "b1", (7, "bob")) is True  # alice hears it
    assert await state.socket_close(1, "a1", (7, "alice")) is False  # nobody is left
    assert await state.presence_join(7, "carol", "c1") == (True, ["carol"])


async def test_closing_frees_the_socket_slot_with_or_without_presence(state):
    assert await state.socket_open(1, "a1", limit=1)
    assert not await state.socket_open(1, "a2", limit=1)
    # A socket that never joined its room (refused after counting) leaves its slot only.
    assert await state.socket_close(1, "a1") is False
    assert await state.socket_open(1, "a2", limit=1)
    await state.presence_join(7, "alice", "a2")
    await state.socket_close(1, "a2", (7, "alice"))
    assert await state.socket_open(1, "a3", limit=1)


async def test_a_socket_not_in_the_presence_does_not_make_its_user_leave(state):
    assert await state.socket_open(1, "a1", limit=2)
    assert await state.socket_open(1, "a2", limit=2)
    await state.presence_join(7, "alice", "a1")
    # a2 was counted and is closing as if it had joined: alice is still there through a1.
    assert await state.socket_close(1, "a2", (7, "alice")) is False
    assert (await state.presence_join(7, "bob", "b1"))[1] == ["alice", "bob"]
