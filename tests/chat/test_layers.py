"""The embedded default's channel layer: Channels' in-memory layer, its expiry sweep amortised."""

import asyncio

from channels.layers import InMemoryChannelLayer as StockLayer

from chat.layers import InMemoryChannelLayer


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
