"""Fixtures shared by the socket tests of this package."""

import secrets

import pytest

from chat.layers import RedisChannelLayer
from tests.factories import make_member, make_room, make_user
from tests.services import reachable_redis_url, redis_clear_prefix


@pytest.fixture
def people():
    """alice owns the public lobby, bob is a member."""
    alice, bob = make_user("alice"), make_user("bob")
    room = make_room("lobby", owner=alice)
    make_member(room, bob)
    return alice, bob, room


@pytest.fixture
async def redis_layers():
    """A factory of Redis channel layers (chat.layers, one per "process"), on the tests' Redis,
    sharing a key prefix of the test's own, closed and cleared after."""
    url, prefix = reachable_redis_url(), f"test-layer-{secrets.token_hex(4)}"
    made = []

    def make(**config) -> RedisChannelLayer:
        layer = RedisChannelLayer(hosts=[url], prefix=f"{prefix}:", capacity=1000, **config)
        made.append(layer)
        return layer

    yield make
    for layer in made:
        await layer.close_pools()
    redis_clear_prefix(url, prefix)
