"""The hub's fan-out: which writes it asks the server to send together, and in what order."""

import json
from dataclasses import dataclass, field

import pytest

from chat import broadcast, frames, services
from chat import hub as hub_module
from chat.hub import Hub, RoomFeed
from chat.models import MessageLog
from chat.runtime import get_runtime
from tests.chat.helpers import sync
from tests.factories import make_room, make_user


@dataclass(eq=False)
class RecordingSocket:
    socket_id: str
    user_id: int
    writes: list[tuple[bytes, bool]] = field(default_factory=list)
    sent: int = 0
    closing: bool = False
    ready: bool = True
    presence_version: int = 0

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


async def test_a_presence_change_reaches_the_sockets_whose_list_predates_it():
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=7, delivered=0)
    older = RecordingSocket("older", user_id=1, presence_version=4)
    newer = RecordingSocket("newer", user_id=2, presence_version=5)  # its hello showed it
    joining, excluded = JoiningSocket("joining", user_id=3), JoiningSocket("excluded", user_id=4)
    closing = JoiningSocket("closing", user_id=5, closing=True)
    feed.sockets = {s.socket_id: s for s in (older, newer, joining, excluded, closing)}
    event = broadcast.presence_event(7, "bob", '{"type":"presence"}', 5, exclude_user=4)
    await hub._on_room_event(feed, event)
    assert len(older.writes) == older.sent == 1
    assert newer.writes == []
    assert joining.held == [event]  # to decide once its hello's version is known
    assert excluded.held == closing.held == []
    assert joining.writes == excluded.writes == closing.writes == []


async def test_a_presence_change_older_than_one_already_come_for_its_user_is_dropped():
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=7, delivered=0)
    ready, joining = RecordingSocket("ready", user_id=1), JoiningSocket("joining", user_id=2)
    feed.sockets = {s.socket_id: s for s in (ready, joining)}
    # A reload through two processes: "joined bob" (6) overtakes the "left bob" (5) before it.
    joined = broadcast.presence_event(7, "bob", '{"joined":"bob"}', 6)
    left = broadcast.presence_event(7, "bob", '{"left":"bob"}', 5)
    carol = broadcast.presence_event(7, "carol", '{"left":"carol"}', 4)
    for event in (joined, left, carol):
        await hub._on_room_event(feed, event)
    assert [payload for payload, _ in ready.writes] == [
        frames.prepared(joined["text"]).payloadHybi,
        frames.prepared(carol["text"]).payloadHybi,  # another user's: its own order
    ]
    assert joining.held == [joined, carol]


@dataclass(eq=False)
class TextSocket:
    """A socket without the server's prepared-frame path: the hub hands it each frame's text."""

    socket_id: str
    user_id: int
    texts: list[str] = field(default_factory=list)
    sent: int = 0
    closing: bool = False
    ready: bool = True
    presence_version: int = 0
    fast_send = None

    async def send_text(self, text: str) -> None:
        self.texts.append(text)


def _message(seq: int) -> str:
    data = {"seq": seq, "room": "lobby", "author": "alice", "created_at": "2026-12-07T10:00:00Z"}
    return frames.message({**data, "body": f"m{seq}", "client_id": f"c{seq}"})


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["behind a gap", "late", "filled from the database"])
async def test_a_deleted_or_restored_frame_never_overtakes_its_message(path):
    """A client shows the first copy of a seq it gets and ignores later ones (the protocol):
    a `deleted` that came first would leave the deleted body on its screen."""

    def stored_room():
        # Messages 1 and 2 stored, 2 deleted since: what a gap fill reads.
        alice = make_user("alice")
        room = make_room("lobby", owner=alice)
        for n in (1, 2):
            services.message_send(room=room, author=alice, body=f"m{n}", client_id=f"c{n}")
        services.message_delete(actor=alice, room=room, seq=2)
        return room.pk

    room_id = await sync(stored_room)()
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=room_id, delivered=0)
    sock = TextSocket("s", user_id=1)
    feed.sockets = {"s": sock}

    async def event(e):
        await hub._on_room_event(feed, e)

    def messages(seq: int):
        return broadcast.messages_event(room_id, [(seq, _message(seq))])

    about_2 = [
        broadcast.frame_event(room_id, frames.deleted("lobby", 2), seq=2),
        broadcast.frame_event(room_id, frames.restored(json.loads(_message(2))), seq=2),
        broadcast.frame_event(room_id, frames.deleted("lobby", 2), seq=2),
    ]
    if path == "behind a gap":
        await event(messages(2))  # parked: 1 is missing
        for e in about_2:
            await event(e)
        await event(messages(1))
    elif path == "late":
        await event(messages(1))
        for e in about_2:
            await event(e)
        await event(messages(2))
    else:
        await event(messages(3))  # parked: 1 and 2 missing, read from the database
        for e in about_2:
            await event(e)
        feed.gap_timer.cancel()
        feed.gap_timer, feed.filling = None, True
        await hub._fill(feed)
    order = [(f["type"], f.get("seq") or f["message"]["seq"]) for f in map(json.loads, sock.texts)]
    assert order[: order.index(("message", 2)) + 1] == [("message", 1), ("message", 2)]
    about = [kind for kind, seq in order if seq == 2]
    assert about == ["message", "deleted", "restored", "deleted"]
    assert feed.after == {}


def _change(room_id: int, kind: str, seq: int, version: int | None) -> dict:
    text = (
        frames.deleted("lobby", seq)
        if kind == "deleted"
        else frames.restored(json.loads(_message(seq)))
    )
    return broadcast.frame_event(room_id, text, seq=seq, version=version)


def _changes_sent(sock: TextSocket) -> list[tuple[str, int]]:
    return [
        (f["type"], f.get("seq") or f["message"]["seq"])
        for f in map(json.loads, sock.texts)
        if f["type"] in ("deleted", "restored")
    ]


@pytest.mark.parametrize("parked", [False, True], ids=["delivered", "behind a gap"])
async def test_a_change_to_a_message_older_than_one_already_sent_is_dropped(parked):
    """A deletion (version 5) and a restoration (version 9) made moments apart on two processes
    arrive restoration first: sent in arrival order, every screen would keep the message
    deleted. The older change is dropped; another message's changes keep their own order."""
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=7, delivered=0)
    sock = TextSocket("s", user_id=1)
    feed.sockets = {"s": sock}
    if not parked:
        await hub._on_room_event(feed, broadcast.messages_event(7, [(1, _message(1))]))
        await hub._on_room_event(feed, broadcast.messages_event(7, [(2, _message(2))]))
    else:
        await hub._on_room_event(feed, broadcast.messages_event(7, [(2, _message(2))]))
    for event in (
        _change(7, "restored", 2, 9),
        _change(7, "deleted", 2, 5),  # older than the restoration: dropped
        _change(7, "deleted", 1, 3),  # message 1's own: older version, another message
        _change(7, "deleted", 2, 12),  # a later deletion: sent
    ):
        await hub._on_room_event(feed, event)
    if parked:
        feed.gap_timer.cancel()
        feed.gap_timer = None
        await hub._on_room_event(feed, broadcast.messages_event(7, [(1, _message(1))]))
    sent = [("restored", 2), ("deleted", 1), ("deleted", 2)]
    if parked:  # held for their messages, then sent message by message
        sent = [("deleted", 1), ("restored", 2), ("deleted", 2)]
    assert _changes_sent(sock) == sent
    assert feed.changes_seen == {2: 12, 1: 3}


async def test_a_change_older_than_the_feeds_start_is_dropped():
    """A process starting to serve a room reads its first socket's state and the audit chain's
    position in one statement: a change at or before that position is in what its sockets
    read, so its frame, still on its way from another process, is stale."""
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=7, delivered=2, changes_floor=10)
    sock = TextSocket("s", user_id=1)
    feed.sockets = {"s": sock}
    for event in (_change(7, "deleted", 2, 8), _change(7, "restored", 2, 12)):
        await hub._on_room_event(feed, event)
    assert _changes_sent(sock) == [("restored", 2)]


@dataclass(eq=False)
class AttachingSocket(TextSocket):
    room_id: int = 7
    ready: bool = False

    async def on_control(self, event) -> None:
        pass


async def test_a_feed_starts_from_the_audit_position_its_first_read_gives():
    hub = Hub(get_runtime())
    first, second = AttachingSocket("a", user_id=1), AttachingSocket("b", user_id=2)

    async def read_first():
        return "state a", 5, 42

    async def read_second():
        return "state b", 9, 60  # a later socket's read: the feed keeps its start

    try:
        assert await hub.attach(first, read_first) == "state a"
        assert await hub.attach(second, read_second) == "state b"
        feed = hub.rooms[7]
        assert (feed.delivered, feed.changes_floor) == (5, 42)
    finally:
        for sock in (first, second):
            await hub.detach(sock)
        await hub.stop()


async def test_unversioned_changes_are_sent_in_arrival_order():
    """A publisher without versions (a process of the previous release, during a rolling
    upgrade): its changes go out as they come, as they did."""
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=7, delivered=1)
    sock = TextSocket("s", user_id=1)
    feed.sockets = {"s": sock}
    for kind in ("restored", "deleted", "restored"):
        await hub._on_room_event(feed, _change(7, kind, 1, None))
    assert _changes_sent(sock) == [("restored", 1), ("deleted", 1), ("restored", 1)]
    assert feed.changes_seen == {}


async def test_the_changes_remembered_per_room_are_bounded(monkeypatch):
    monkeypatch.setattr(hub_module, "VERSIONS_KEPT", 3)
    hub = Hub(get_runtime())
    feed = RoomFeed(room_id=7, delivered=10)
    sock = TextSocket("s", user_id=1)
    feed.sockets = {"s": sock}
    for version, seq in enumerate((1, 2, 3, 1, 4), start=1):
        await hub._on_room_event(feed, _change(7, "deleted", seq, version))
    # Message 1 was changed again (version 4), so 2, the oldest change, is the one forgotten.
    assert feed.changes_seen == {3: 3, 1: 4, 4: 5}
    assert len(sock.texts) == 5


@pytest.mark.django_db(transaction=True)
async def test_each_change_to_a_message_is_published_with_a_later_version(monkeypatch):
    """The version is the chain position of the change's audit row: a deletion, a restoration
    and a deletion again of one message carry increasing versions, whatever process makes them."""
    sent: list[dict] = []
    monkeypatch.setattr(broadcast, "_send", lambda group, event: sent.append(event))

    def moderate():
        alice = make_user("alice")
        room = make_room("lobby", owner=alice)
        services.message_send(room=room, author=alice, body="hi", client_id="c1")
        message = services.message_delete(actor=alice, room=room, seq=1)
        services.message_restore(actor=alice, message=message)
        services.message_delete(actor=alice, room=room, seq=1)

    await sync(moderate)()
    changes = [e for e in sent if e["type"] == "hub.frame" and e.get("seq") == 1]
    assert [json.loads(e["text"])["type"] for e in changes] == ["deleted", "restored", "deleted"]
    versions = [e["version"] for e in changes]
    assert versions == sorted(set(versions))  # strictly increasing
    logged = await sync(
        lambda: list(
            MessageLog.objects.filter(event__in=["deleted", "restored"])
            .order_by("chain_seq")
            .values_list("chain_seq", flat=True)
        )
    )()
    assert versions == logged
