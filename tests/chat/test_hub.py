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
