"""The channel layers: Channels' in-memory layer with its expiry sweep amortised, and
channels_redis's layer receiving in batches, on a real Redis."""

import asyncio

import pytest
from channels.layers import InMemoryChannelLayer as StockLayer

from chat.layers import InMemoryChannelLayer, RedisChannelLayer


async def test_group_send_does_not_sweep_every_group_on_every_message(monkeypatch):
    sweeps = []
    monkeypatch.setattr(StockLayer, "_clean_expired", lambda self: sweeps.append(1))
    layer = InMemoryChannelLayer(clean_interval=60)
    for room in range(200):
        await layer.group_add(f"room.{room}", "hub.inmemory!abc")
    for _ in range(100):
        await layer.group_send("room.7", {"type": "room.event"})
        await layer.receive("hub.inmemory!abc")
    assert len(sweeps) == 1  # the stock layer: 200 (one per group_send and one per receive)


async def test_expired_messages_and_memberships_still_go():
    layer = InMemoryChannelLayer(expiry=0.05, group_expiry=0, clean_interval=0.1)
    await layer.group_add("room.1", "gone.inmemory!abc")
    await layer.send("gone.inmemory!abc", {"type": "never.read"})
    await asyncio.sleep(0.2)  # past the message's expiry and the sweep interval
    await layer.group_send("room.1", {"type": "after"})  # sweeps first, then sends
    assert "gone.inmemory!abc" not in layer.channels  # the expired message dropped its channel
    assert layer.groups.get("room.1", {}) == {}  # ... and removed it from its groups


async def test_delivery_is_unchanged():
    layer = InMemoryChannelLayer(clean_interval=60)
    await layer.group_add("room.1", "a.inmemory!x")
    await layer.group_add("room.1", "b.inmemory!y")
    await layer.group_send("room.1", {"type": "m", "n": 1})
    assert await layer.receive("a.inmemory!x") == {"type": "m", "n": 1}
    assert await layer.receive("b.inmemory!y") == {"type": "m", "n": 1}
    await layer.group_discard("room.1", "b.inmemory!y")
    await layer.group_send("room.1", {"type": "m", "n": 2})
    assert await layer.receive("a.inmemory!x") == {"type": "m", "n": 2}
    assert "b.inmemory!y" not in layer.channels


async def test_a_zero_interval_sweeps_like_the_stock_layer(monkeypatch):
    sweeps = []
    monkeypatch.setattr(StockLayer, "_clean_expired", lambda self: sweeps.append(1))
    layer = InMemoryChannelLayer(clean_interval=0)
    for _ in range(5):
        await layer.group_send("room.1", {"type": "m"})
    assert len(sweeps) == 5


# --- the Redis layer ---------------------------------------------------------------------------


def _counting_pops(layer: RedisChannelLayer) -> list[int]:
    sizes: list[int] = []
    pop = layer._pop

    async def counted(index, key):
        found = await pop(index, key)
        sizes.append(len(found))
        return found

    layer._pop = counted
    return sizes


async def test_a_backlog_is_received_in_order_a_batch_per_round_trip(redis_layers):
    layer = redis_layers(receive_batch=100)
    channel = await layer.new_channel("chathub")
    for n in range(250):
        await layer.send(channel, {"type": "m", "n": n})
    sizes = _counting_pops(layer)
    received = [(await layer.receive(channel))["n"] for _ in range(250)]
    assert received == list(range(250))
    assert sizes == [100, 100, 50]  # the stock layer: 250 blocking pops, and 750 more calls


async def test_an_empty_channel_waits_for_the_next_message(redis_layers):
    layer = redis_layers()
    channel = await layer.new_channel("chathub")
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await layer.send(channel, {"type": "m", "n": 1})
    assert await asyncio.wait_for(waiting, 10) == {"type": "m", "n": 1}


async def test_a_group_reaches_every_process_once_in_order(redis_layers):
    one, two = redis_layers(), redis_layers()
    hubs = [await one.new_channel("chathub"), await two.new_channel("chathub")]
    await one.group_add("room.1", hubs[0])
    await two.group_add("room.1", hubs[1])
    for n in range(30):
        await one.group_send("room.1", {"type": "m", "n": n})
    for layer, hub in zip((one, two), hubs, strict=True):
        assert [(await layer.receive(hub))["n"] for _ in range(30)] == list(range(30))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(layer.receive(hub), 0.3)  # nothing twice


async def test_a_batch_whose_answer_never_came_is_received_once(redis_layers):
    layer = redis_layers(receive_batch=10)
    channel = await layer.new_channel("chathub")
    for n in range(15):
        await layer.send(channel, {"type": "m", "n": n})
    key = layer.prefix + layer.non_local_name(channel)
    backup = layer._backup_channel_name(key)
    # The script ran in Redis, and its answer was lost (a cancelled receive, a dropped
    # connection): ten messages sit in the backup, not in the channel.
    connection = layer.connection(layer.consistent_hash(layer.non_local_name(channel)))
    lost = await connection.eval(
        layer._POP_BATCH, 3, key, backup, backup + "#", "", "lost-1", 10, 60
    )
    assert len(lost) == 20  # ten members, with their scores
    received = [(await layer.receive(channel))["n"] for _ in range(15)]
    assert received == list(range(15))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.3)


async def test_a_pop_that_never_reached_redis_gives_no_batch_twice(redis_layers):
    layer = redis_layers(receive_batch=10)
    channel = await layer.new_channel("chathub")
    for n in range(5):
        await layer.send(channel, {"type": "m", "n": n})
    assert [(await layer.receive(channel))["n"] for _ in range(5)] == list(range(5))
    # The next pop fails before Redis sees it; the batch received before stays in the backup.
    connection = layer.connection(layer.consistent_hash(layer.non_local_name(channel)))
    real_eval = connection.eval
    calls = []

    async def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("Redis went away")
        return await real_eval(*args, **kwargs)

    connection.eval = failing
    with pytest.raises(ConnectionError):
        await layer.receive(channel)
    await layer.send(channel, {"type": "m", "n": 5})
    assert await layer.receive(channel) == {"type": "m", "n": 5}  # not 0-4 again


async def test_a_cancelled_receive_keeps_the_rest_of_its_batch(redis_layers):
    layer = redis_layers(receive_batch=10)
    channel = await layer.new_channel("chathub")
    for n in range(4):
        await layer.send(channel, {"type": "m", "n": n})
    assert (await layer.receive(channel))["n"] == 0  # the batch of four is here now
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0)  # in the receive, waiting for its turn at the channel
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The stock layer drops a cancelled receive's buffer; the batch lives beside it.
    assert [(await layer.receive(channel))["n"] for _ in range(3)] == [1, 2, 3]


async def test_a_plain_channel_keeps_the_stock_receive(redis_layers):
    # A plain channel may have several receivers at once: no batches, each message once.
    layer = redis_layers()
    sizes = _counting_pops(layer)
    for n in range(40):
        await layer.send("health.plain", {"type": "m", "n": n})

    async def take(count):
        return [(await layer.receive("health.plain"))["n"] for _ in range(count)]

    got = await asyncio.gather(take(15), take(25))
    assert sorted(n for part in got for n in part) == list(range(40))
    assert sizes == []
