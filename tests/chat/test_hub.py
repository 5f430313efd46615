"""The hub's fan-out: which writes it asks the server to send together."""

from dataclasses import dataclass, field

import pytest

from chat import broadcast
from chat.hub import Hub, RoomFeed
from chat.runtime import get_runtime


@dataclass(eq=False)
class RecordingSocket:
    socket_id: str
    user_id: int
    writes: list[tuple[bytes, bool]] = field(default_factory=list)
    sent: int = 0
    closing: bool = False
    ready: bool = True

    def fast_send(self, prepared, cork: bool) -> bool:
        self.writes.append((prepared.payloadHybi, cork))
        return True


@pytest.mark.parametrize(
    ("messages", "corked"), [(1, False), (3, True)], ids=["one message", "a batch"]
)
async def test_a_batch_of_messages_is_corked_and_a_lone_one_is_not(messages, corked):
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=7, delivered=0)
    sockets = [RecordingSocket(f"s{i}", user_id=i) for i in range(2)]
    feed.sockets = {sock.socket_id: sock for sock in sockets}
    items = [(seq, f'{{"type":"message","seq":{seq}}}') for seq in range(1, messages + 1)]
    await hub._on_room_event(feed, broadcast.messages_event(7, items))
    for sock in sockets:
        assert [cork for _, cork in sock.writes] == [corked] * messages
        assert len(sock.writes) == sock.sent == messages
    assert feed.delivered == messages


@dataclass(eq=False)
class JoiningSocket(RecordingSocket):
    ready: bool = False
    held: list[dict] = field(default_factory=list)

    async def on_control(self, event) -> None:
        self.held.append(event)


async def test_a_held_frame_waits_for_joining_sockets_and_an_ordinary_one_does_not():
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=7, delivered=0)
    ready = RecordingSocket("ready", user_id=1)
    joining, excluded = JoiningSocket("joining", user_id=2), JoiningSocket("excluded", user_id=3)
    closing = JoiningSocket("closing", user_id=4, closing=True)
    feed.sockets = {s.socket_id: s for s in (ready, joining, excluded, closing)}
    typing = broadcast.frame_event(7, '{"type":"typing"}')
    presence = broadcast.frame_event(7, '{"type":"presence"}', exclude_user=3, hold=True)
    await hub._on_room_event(feed, typing)
    await hub._on_room_event(feed, presence)
    assert len(ready.writes) == 2  # a ready socket gets both at once
    assert joining.held == [presence]  # a joining one only the held frame, for after its hello
    assert excluded.held == closing.held == []
    assert joining.writes == excluded.writes == closing.writes == []
