"""The room socket: frames, errors, presence, live moderation, limits, resume and audit."""

import asyncio
import gc
import json
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from chat import broadcast, frames, selectors, services
from chat.consumers import RoomConsumer
from chat.hub import GAP_WAIT
from chat.models import MAX_SEQ, ConnectionLog, Membership, Message, MessageLog, Room
from chat.runtime import get_runtime
from chat.state import RedisState, StateUnavailable
from tests.chat.helpers import LAPSED, drain, join, receive_all, send, state_clock_ahead, sync
from tests.factories import make_member, make_room, make_user
from tests.wait import eventually
from tests.ws import WAIT, closed_with, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


# --- hello and messages ---------------------------------------------------------------------------


async def test_hello_describes_room_user_and_presence(people):
    alice, bob, room = people
    a, hello = await join(alice, room)
    assert hello["room"] == "lobby"
    assert hello["user"] == "alice"
    assert hello["role"] == "owner"
    assert hello["last_seq"] == 0
    assert hello["presence"] == ["alice"]
    assert hello["limits"]["max_length"] == 4000
    b, hello_b = await join(bob, room)
    assert hello_b["presence"] == ["alice", "bob"]
    assert (await receive_until(a, "presence"))["joined"] == "bob"
    await a.disconnect()
    await b.disconnect()


async def test_message_is_acked_stored_and_broadcast_to_everyone(people):
    alice, bob, room = people
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    await receive_until(a, "presence")
    await send(a, type="message", body="hello <b>bob</b>", client_id="c-1")
    ack = json.loads(await a.receive_from())
    assert ack == {"type": "ack", "client_id": "c-1", "seq": 1}, (
        "the ack comes before the broadcast"
    )
    mine = await receive_until(a, "message")
    theirs = await receive_until(b, "message")
    assert mine == theirs
    assert theirs["seq"] == 1
    assert theirs["author"] == "alice"
    assert theirs["body"] == "hello <b>bob</b>"
    assert theirs["client_id"] == "c-1"
    assert theirs["room"] == "lobby"
    stored = await sync(Message.objects.get)(room=room, seq=1)
    assert stored.body == "hello <b>bob</b>"
    await a.disconnect()
    await b.disconnect()


async def test_resent_client_id_acks_the_original_and_creates_nothing(people):
    alice, bob, room = people
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    for _ in range(3):
        await send(a, type="message", body="once", client_id="same-id")
        assert (await receive_until(a, "ack"))["seq"] == 1
    assert await sync(Message.objects.filter(room=room).count)() == 1
    assert [f["seq"] for f in await receive_all(b, "message", 1)] == [1]
    assert not [f for f in await drain(b) if f["type"] == "message"]
    await a.disconnect()
    await b.disconnect()


async def test_a_client_id_used_in_another_room_is_refused_not_acked_as_a_resend(people):
    """A resend is matched by author and client_id, and a client_id is its author's in one room
    only: sent to another room it is refused, never acked with the first room's seq (the client
    would drop its new message as stored)."""
    alice, _, room = people
    other = await sync(make_room)("other", owner=alice)
    a, _ = await join(alice, room)
    o, _ = await join(alice, other)
    await send(a, type="message", body="in the lobby", client_id="same-id")
    assert (await receive_until(a, "ack"))["seq"] == 1
    await send(o, type="message", body="elsewhere", client_id="same-id")
    answer = json.loads(await o.receive_from())
    assert (answer["type"], answer.get("code"), answer["client_id"]) == (
        "error",
        "invalid_frame",
        "same-id",
    )
    assert await sync(Message.objects.filter(room=other).count)() == 0
    await a.disconnect()
    await o.disconnect()


async def test_seq_is_gap_free_per_room(people):
    alice, _, room = people
    other = await sync(make_room)("other", owner=alice)
    a, _ = await join(alice, room)
    o, _ = await join(alice, other)
    for i in range(5):
        await send(a, type="message", body=f"a{i}", client_id=f"a{i}")
        await send(o, type="message", body=f"o{i}", client_id=f"o{i}")
    a_acks = [(await receive_until(a, "ack"))["seq"] for _ in range(5)]
    o_acks = [(await receive_until(o, "ack"))["seq"] for _ in range(5)]
    assert a_acks == o_acks == [1, 2, 3, 4, 5]
    assert (await sync(Room.objects.get)(pk=room.pk)).last_seq == 5
    await a.disconnect()
    await o.disconnect()


async def test_a_room_s_first_socket_reads_its_state_and_the_feed_s_start_at_once(
    people, monkeypatch
):
    """One read after subscribing serves both (chat.hub.Hub.attach): the socket's context and
    the last_seq the room's feed starts from, which hello gives."""
    alice, bob, room = people
    read, calls = selectors.socket_context, []

    def recorded(**where):
        context = read(**where)
        calls.append(where)
        # As if 41 messages had been committed just before the first read, 57 before the second.
        context.room.last_seq = 41 if len(calls) == 1 else 57
        return context

    monkeypatch.setattr(selectors, "socket_context", recorded)
    a, hello = await join(alice, room)
    assert (hello["last_seq"], len(calls)) == (41, 1)
    # Not the first: its context is read, and the feed, started at 41, goes on from there.
    b, hello = await join(bob, room)
    assert (hello["last_seq"], len(calls)) == (41, 2)
    await a.disconnect()
    await b.disconnect()


# --- history --------------------------------------------------------------------------------------


async def test_history_pages_after_and_before_with_tombstones(people):
    alice, bob, room = people

    def seed():
        for i in range(1, 8):
            services.message_send(room=room, author=alice, body=f"m{i}", client_id=f"h{i}")
        services.message_delete(actor=alice, room=room, seq=3)

    await sync(seed)()
    b, hello = await join(bob, room)
    assert hello["last_seq"] == 7
    await send(b, type="history", after=1, limit=3)
    page = await receive_until(b, "history")
    assert [m["seq"] for m in page["messages"]] == [2, 3, 4]
    assert page["has_more"] is True
    assert page["after"] == 1
    tombstone = page["messages"][1]
    assert tombstone["deleted"] is True
    assert "body" not in tombstone
    await send(b, type="history", after=4, limit=100)
    rest = await receive_until(b, "history")
    assert [m["seq"] for m in rest["messages"]] == [5, 6, 7]
    assert rest["has_more"] is False
    await send(b, type="history", before=3, limit=10)
    older = await receive_until(b, "history")
    assert [m["seq"] for m in older["messages"]] == [1, 2]
    await send(b, type="history")
    newest = await receive_until(b, "history")
    assert [m["seq"] for m in newest["messages"]] == list(range(1, 8))
    await b.disconnect()


@pytest.mark.parametrize(
    ("full_at", "now", "wait", "next_full_at"),
    [
        (0.0, 100.0, 0.0, 100.5),  # an idle socket: at once
        (100.5, 100.0, 0.0, 101.0),  # the second of a burst of 3: at once
        (101.0, 100.0, 0.0, 101.5),  # the third: at once
        (101.5, 100.0, 0.5, 102.0),  # the fourth waits one interval
        (102.0, 100.0, 1.0, 102.5),  # the fifth, two
        (102.5, 101.25, 0.25, 103.0),  # the fifth, asked later, waits less
        (101.0, 103.0, 0.0, 103.5),  # a pause refills the bucket
    ],
)
def test_pace_lets_a_burst_through_then_one_per_interval(full_at, now, wait, next_full_at):
    from chat.consumers import pace

    assert pace(full_at, now, 2.0, 3) == (wait, next_full_at)


@pytest.mark.parametrize("kind", ["history", "resync"])
async def test_database_reads_past_the_burst_wait_their_turn(people, settings, kind):
    """A socket's `history` and `resync` read the database: past CHAT_READ_BURST they are
    answered at CHAT_READ_RATE: one whose turn comes within READ_WAIT_MAX waits for it. (A
    socket that asks in a loop would otherwise keep the database busy.) Here: a burst of 2,
    then one read every 0.8 s."""
    settings.CHAT_READ_RATE, settings.CHAT_READ_BURST = 1 / 0.8, 2
    alice, bob, room = people
    await sync(_seed_messages)(room, alice, 3)
    b, _ = await join(bob, room)
    # Answers of three messages each: the page, or all three restored (the client shows them
    # deleted; they are not).
    frame = {"history": {"after": 0}, "resync": {"from": 1, "to": 3, "deleted": [1, 2, 3]}}[kind]
    listed = "messages" if kind == "history" else "restored"
    for _ in range(3):
        await send(b, type=kind, **frame)
    answers = await receive_all(b, kind, 2)
    assert [len(a[listed]) for a in answers] == [3, 3]
    # The third waits its turn: nothing yet, then its answer, whole.
    assert await drain(b, timeout=0.5) == []
    third = await receive_until(b, kind)
    assert len(third[listed]) == 3
    await b.disconnect()


async def test_reads_whose_turn_is_too_far_off_are_refused_and_count_as_abuse(people, settings):
    """A client that queues reads faster than their turn comes is refused, not queued: while a
    read waits, the socket's later frames wait unread in the server. Here every read past the
    burst of 2 would wait 10 s (READ_WAIT_MAX is 1 s), and the third refusal closes 4429."""
    settings.CHAT_READ_RATE, settings.CHAT_READ_BURST = 0.1, 2
    settings.CHAT_ABUSE_LIMIT = 2  # the third refusal closes
    _, bob, room = people
    b, _ = await join(bob, room)
    for _ in range(5):
        await send(b, type="history", after=0)
    assert len(await receive_all(b, "history", 2)) == 2
    refusals = await receive_all(b, "error", 3)
    assert {f["code"] for f in refusals} == {"rate_limited"}
    assert (await closed_with(b))[0] == 4429


# --- resync: deletions and restorations made while a client was away ------------------------------


def _seed_messages(room, author, count: int, *, body: str = "m{}") -> None:
    for i in range(1, count + 1):
        services.message_send(room=room, author=author, body=body.format(i), client_id=f"r{i}")


async def test_resync_reports_what_was_deleted_and_restored_while_away(people):
    alice, bob, room = people

    def before():
        _seed_messages(room, alice, 6)
        services.message_delete(actor=alice, room=room, seq=2)

    def while_away():
        services.message_delete(actor=alice, room=room, seq=4)
        services.message_delete(actor=alice, room=room, seq=5)
        services.message_restore(actor=alice, message=Message.objects.get(room=room, seq=2))

    await sync(before)()
    # Bob's page shows 1-6 with 2 deleted; his socket drops, and meanwhile:
    await sync(while_away)()
    b, _ = await join(bob, room)
    await send(b, type="resync", **{"from": 1, "to": 6, "deleted": [2]})
    answer = await receive_until(b, "resync")
    assert answer["from"] == 1
    assert answer["to"] == 6
    assert answer["deleted"] == [4, 5]
    assert [(m["seq"], m["body"], m["author"]) for m in answer["restored"]] == [(2, "m2", "alice")]
    # Asked again with the state the answer gave, nothing is left to change.
    await send(b, type="resync", **{"from": 1, "to": 6, "deleted": [4, 5]})
    again = await receive_until(b, "resync")
    assert (again["deleted"], again["restored"]) == ([], [])
    await b.disconnect()


async def test_a_resync_answer_too_big_for_a_frame_covers_a_prefix_of_the_range(people, settings):
    alice, bob, room = people
    settings.CHAT_MAX_FRAME_BYTES = 8192

    def seed():
        _seed_messages(room, alice, 6, body="{}" + "x" * 3000)
        for seq in (1, 2, 3, 5, 6):
            services.message_delete(actor=alice, room=room, seq=seq)
        for seq in (1, 2, 3):
            services.message_restore(actor=alice, message=Message.objects.get(room=room, seq=seq))

    await sync(seed)()
    b, _ = await join(bob, room)
    # As a client does: ask from the seq after each answer's `to` until the range is covered.
    asked, restored, deleted, start = [], [], [], 1
    while start <= 6:
        shown_deleted = [seq for seq in (1, 2, 3) if seq >= start]
        await send(b, type="resync", **{"from": start, "to": 6, "deleted": shown_deleted})
        answer = await receive_until(b, "resync")
        assert answer["from"] == start
        asked.append((start, answer["to"]))
        restored += [m["seq"] for m in answer["restored"]]
        deleted += answer["deleted"]
        start = answer["to"] + 1
    # Half a frame holds one 3 KB message: an answer stops after the first restored one that
    # fills it, and the next covers the rest.
    assert asked == [(1, 1), (2, 2), (3, 6)]
    assert restored == [1, 2, 3]
    assert deleted == [5, 6]
    await b.disconnect()


async def test_resync_reads_at_most_a_history_page_of_restored_messages(people, settings):
    alice, bob, room = people
    settings.CHAT_HISTORY_LIMIT = 2

    def seed():
        _seed_messages(room, alice, 6)
        for seq in range(1, 7):
            services.message_delete(actor=alice, room=room, seq=seq)
        for seq in (1, 2, 3, 4):
            services.message_restore(actor=alice, message=Message.objects.get(room=room, seq=seq))

    await sync(seed)()
    b, _ = await join(bob, room)
    await send(b, type="resync", **{"from": 1, "to": 6, "deleted": [1, 2, 3, 4, 5]})
    answer = await receive_until(b, "resync")
    # Two restored messages read; the answer stops before the third candidate (3).
    assert (answer["to"], answer["deleted"]) == (2, [])
    assert [m["seq"] for m in answer["restored"]] == [1, 2]
    await send(b, type="resync", **{"from": 3, "to": 6, "deleted": [3, 4, 5]})
    rest = await receive_until(b, "resync")
    assert (rest["to"], rest["deleted"]) == (6, [6])
    assert [m["seq"] for m in rest["restored"]] == [3, 4]
    await b.disconnect()


@pytest.mark.parametrize(("frame_bytes", "most"), [(64 * 1024, 1000), (2048, 39)])
async def test_hello_says_how_many_seqs_a_resync_may_cover(people, settings, frame_bytes, most):
    alice, _, room = people
    settings.CHAT_MAX_FRAME_BYTES = frame_bytes
    a, hello = await join(alice, room)
    assert hello["limits"]["resync_max_seqs"] == most
    # A request listing every seq of the widest range as deleted fits in a frame.
    widest = {"type": "resync", "from": MAX_SEQ - most + 1, "to": MAX_SEQ}
    widest["deleted"] = list(range(widest["from"], widest["to"] + 1))
    assert len(json.dumps(widest, separators=(",", ":"))) <= frame_bytes
    await send(a, type="resync", **{"from": 1, "to": most})
    assert (await receive_until(a, "resync"))["to"] == most
    await send(a, type="resync", **{"from": 1, "to": most + 1})
    assert (await receive_until(a, "error"))["code"] == "invalid_frame"
    await a.disconnect()


RESYNC_REFUSED = {
    "no from": {"to": 3},
    "no to": {"from": 1},
    "from 0": {"from": 0, "to": 3},
    "to before from": {"from": 5, "to": 4},
    "from not an integer": {"from": "1", "to": 3},
    "more seqs than hello.limits.resync_max_seqs": {"from": 1, "to": 1000 + 1},
    "deleted not a list": {"from": 1, "to": 3, "deleted": "2"},
    "deleted outside the range": {"from": 1, "to": 3, "deleted": [4]},
    "deleted not integers": {"from": 1, "to": 3, "deleted": [True]},
    "deleted longer than the range": {"from": 1, "to": 3, "deleted": [1, 1, 1, 1]},
}


@pytest.mark.parametrize("fields", RESYNC_REFUSED.values(), ids=RESYNC_REFUSED.keys())
async def test_malformed_resync_gets_an_invalid_frame_error(people, fields):
    alice, _, room = people
    a, _ = await join(alice, room)
    await send(a, type="resync", **fields)
    error = await receive_until(a, "error")
    assert error["code"] == "invalid_frame"
    assert not [f for f in await drain(a) if f["type"] == "resync"]
    await a.disconnect()


# --- delete, typing, ping -------------------------------------------------------------------------


async def test_delete_broadcasts_and_is_refused_to_others(people):
    alice, bob, room = people
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    await send(b, type="message", body="bob's", client_id="b1")
    await receive_until(b, "ack")
    await send(a, type="message", body="alice's", client_id="a1")
    await receive_until(a, "ack")
    await send(b, type="delete", seq=2)
    error = await receive_until(b, "error")
    assert error["code"] == "forbidden"
    await send(b, type="delete", seq=99)
    assert (await receive_until(b, "error"))["code"] == "not_found"
    await send(b, type="delete", seq=1)
    assert await receive_until(a, "deleted") == {"type": "deleted", "room": "lobby", "seq": 1}
    assert (await receive_until(b, "deleted"))["seq"] == 1
    # The owner (a moderator) may delete anyone's message.
    await send(a, type="delete", seq=2)
    assert (await receive_until(b, "deleted"))["seq"] == 2
    events = await sync(lambda: list(MessageLog.objects.values_list("event", "username", "seq")))()
    assert ("deleted", "bob", 1) in events
    assert ("deleted", "alice", 2) in events
    await a.disconnect()
    await b.disconnect()


async def test_typing_reaches_others_not_the_sender_and_is_throttled(people, settings):
    # An interval no slow moment of the host can outlast between the two typing frames.
    settings.CHAT_TYPING_INTERVAL = 60
    alice, bob, room = people
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    await send(a, type="typing")
    assert await receive_until(b, "typing") == {"type": "typing", "room": "lobby", "user": "alice"}
    await send(a, type="typing")
    assert (await receive_until(a, "error"))["code"] == "rate_limited"
    assert not [f for f in await drain(a) if f["type"] == "typing"]
    await a.disconnect()
    await b.disconnect()


async def test_ping_pong(people):
    alice, _, room = people
    a, _ = await join(alice, room)
    await send(a, type="ping")
    assert await receive_until(a, "pong") == {"type": "pong"}
    await a.disconnect()


# --- errors keep the socket open ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "invalid_frame"),
        ("[1, 2]", "invalid_frame"),
        ('{"no": "type"}', "invalid_frame"),
        ('{"type": 7}', "invalid_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "auth", "ticket": "x"}', "unknown_type"),
        ('{"type": "message", "body": "x"}', "invalid_frame"),
        ('{"type": "message", "body": "x", "client_id": "bad id!"}', "invalid_frame"),
        ('{"type": "message", "body": "   ", "client_id": "c"}', "invalid_frame"),
        ('{"type": "message", "body": 5, "client_id": "c"}', "invalid_frame"),
        ('{"type": "message", "body": "a\\u0000b", "client_id": "c"}', "invalid_frame"),
        ('{"type": "message", "body": "\\ud800", "client_id": "c"}', "invalid_frame"),
        ('{"type": "message", "body": "a\\rb", "client_id": "c"}', "invalid_frame"),
        ('{"type": "message", "body": "a\\u0085b", "client_id": "c"}', "invalid_frame"),
        ('{"type": "message", "body": "evil\\u202etxt.exe", "client_id": "c"}', "invalid_frame"),
        ('{"type": "message", "body": "x\\u2066y", "client_id": "c"}', "invalid_frame"),
        (json.dumps({"type": "message", "body": "x" * 4001, "client_id": "c"}), "too_long"),
        ('{"type": "history", "after": -1}', "invalid_frame"),
        ('{"type": "history", "after": true}', "invalid_frame"),
        ('{"type": "history", "after": 1, "before": 5}', "invalid_frame"),
        ('{"type": "history", "limit": 101}', "invalid_frame"),
        ('{"type": "history", "after": 1e400}', "invalid_frame"),
        ('{"type": "delete", "seq": "1"}', "invalid_frame"),
    ],
)
async def test_bad_frame_gets_error_and_socket_stays_open(people, raw, code):
    alice, _, room = people
    a, _ = await join(alice, room)
    await a.send_to(text_data=raw)
    error = await receive_until(a, "error")
    assert error["code"] == code
    assert error["detail"]
    await send(a, type="ping")
    await receive_until(a, "pong")
    await a.disconnect()
    await get_runtime().audit.flush()
    rejected = await sync(lambda: list(MessageLog.objects.filter(event="rejected")))()
    assert [(r.reason, r.username, r.connection_id is not None) for r in rejected] == [
        (code, "alice", True)
    ]
    assert await sync(Message.objects.count)() == 0


async def test_binary_frame_is_refused(people):
    alice, _, room = people
    a, _ = await join(alice, room)
    await a.send_to(bytes_data=b"\x00\x01")
    assert (await receive_until(a, "error"))["code"] == "invalid_frame"
    await a.disconnect()


async def test_oversized_frame_closes_1009(people, settings):
    settings.CHAT_MAX_FRAME_BYTES = 1024
    alice, _, room = people
    a, _ = await join(alice, room)
    # 1,251 bytes in UTF-8 but 651 characters: over the limit in bytes only. Not through send(),
    # whose json.dumps escapes each "é" as six ASCII characters: too long even counted in
    # characters, that frame never reached the byte count.
    body = {"type": "message", "body": "é" * 600, "client_id": "big"}
    frame = json.dumps(body, ensure_ascii=False)
    assert len(frame) <= 1024 < len(frame.encode())
    await a.send_to(text_data=frame)
    assert (await closed_with(a))[0] == 1009
    await a.disconnect()


async def test_crlf_is_stored_as_lf_and_direction_marks_are_kept(people):
    alice, _, room = people
    a, _ = await join(alice, room)
    await send(a, type="message", body="one\r\ntwo \u200f\u05e9\u05dc\u05d5\u05dd", client_id="c")
    await receive_until(a, "ack")
    stored = await sync(Message.objects.get)(room=room, seq=1)
    assert stored.body == "one\ntwo \u200f\u05e9\u05dc\u05d5\u05dd"
    await a.disconnect()


async def test_errors_for_messages_carry_the_client_id(people):
    alice, _, room = people
    a, _ = await join(alice, room)
    await send(a, type="message", body="x" * 4001, client_id="long-one")
    assert (await receive_until(a, "error"))["client_id"] == "long-one"
    await a.disconnect()


# --- presence -------------------------------------------------------------------------------------


async def test_presence_counts_tabs(people):
    alice, bob, room = people
    b, _ = await join(bob, room)
    tab1, _ = await join(alice, room)
    tab2, hello2 = await join(alice, room)
    assert hello2["presence"] == ["alice", "bob"]
    joined = await receive_all(b, "presence", 1)
    assert joined == [{"type": "presence", "room": "lobby", "joined": "alice"}]
    assert not [f for f in await drain(b) if f["type"] == "presence"]  # not for the second tab
    await tab1.disconnect()
    assert not [f for f in await drain(b) if f["type"] == "presence"]
    await tab2.disconnect()
    assert await receive_until(b, "presence") == {
        "type": "presence",
        "room": "lobby",
        "left": "alice",
    }
    await b.disconnect()


async def test_presence_is_announced_only_to_someone_there_to_hear_it(people, monkeypatch):
    alice, bob, room = people
    published = []
    publish = broadcast.apublish

    async def recording(group, event):
        published.append(event)
        await publish(group, event)

    monkeypatch.setattr(broadcast, "apublish", recording)

    def presence_frames():
        return [
            json.loads(e["text"])
            for e in published
            if json.loads(e.get("text") or "{}").get("type") == "presence"
        ]

    a, _ = await join(alice, room)  # alone: nobody to tell
    await a.disconnect()  # the last to leave: nobody to tell
    assert presence_frames() == []
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    await b.disconnect()
    assert [f.get("joined") or f.get("left") for f in presence_frames()] == ["bob", "bob"]
    assert (await receive_until(a, "presence"))["joined"] == "bob"
    assert (await receive_until(a, "presence"))["left"] == "bob"
    await a.disconnect()
    assert len(presence_frames()) == 2


def _change(frame: dict) -> tuple[str, str]:
    """A presence frame as (joined or left, username)."""
    [change] = [(kind, frame[kind]) for kind in ("joined", "left") if kind in frame]
    return change


async def held_soon(sock: RoomConsumer) -> None:
    """Wait until a socket that is joining holds an event from the hub."""
    await eventually(lambda: sock._held, "the joining socket held an event")


async def test_a_presence_change_while_a_socket_joins_reaches_it_after_its_hello(
    people, monkeypatch
):
    alice, bob, room = people
    a, _ = await join(alice, room)
    accept = RoomConsumer._accept

    async def alice_leaves_meanwhile(self):
        # bob is in the presence and his hello's list is read (alice is in it), but he is not
        # ready for frames yet: alice leaves now.
        if self.username == "bob":
            await a.disconnect()
            await held_soon(self)  # the "left alice" came while bob was joining
        await accept(self)

    monkeypatch.setattr(RoomConsumer, "_accept", alice_leaves_meanwhile)
    b, hello = await join(bob, room)
    assert hello["presence"] == ["alice", "bob"]
    assert (await receive_until(b, "presence"))["left"] == "alice"
    await b.disconnect()


async def test_a_change_a_joining_socket_s_list_already_shows_is_not_replayed(people, monkeypatch):
    alice, bob, room = people
    a, _ = await join(alice, room)
    b0, _ = await join(bob, room)
    assert (await receive_until(a, "presence"))["joined"] == "bob"
    state = get_runtime().state
    presence_join = state.presence_join

    async def first_tab_closes_meanwhile(room_id, username, socket_id):
        # A reload: bob's second tab has subscribed to the room, his first closes before the
        # second reads the room's list. The "left bob" it causes reaches the second tab first.
        joining = get_runtime().hub.rooms[room_id].sockets[socket_id]
        if username == "bob" and not joining._held:
            await b0.disconnect()
            await held_soon(joining)
        return await presence_join(room_id, username, socket_id)

    monkeypatch.setattr(state, "presence_join", first_tab_closes_meanwhile)
    b1, hello = await join(bob, room)
    assert hello["presence"] == ["alice", "bob"]
    assert not [f for f in await drain(b1) if f["type"] == "presence"]  # not "left bob"
    changes = await receive_all(a, "presence", 2)
    assert [_change(f) for f in changes] == [("left", "bob"), ("joined", "bob")]
    assert await drain(a) == []
    await a.disconnect()
    await b1.disconnect()


def close_unreachable(monkeypatch) -> None:
    """Make the sockets' closes fail to reach the shared state (Redis down a moment): what they
    leave in it is what a process that died leaves, leases nobody renews or closes."""

    async def unreachable(*args):
        raise StateUnavailable("the shared state is unreachable")

    monkeypatch.setattr(get_runtime().state, "socket_close", unreachable)


async def test_a_user_whose_close_was_lost_is_announced_gone_once_the_lease_lapses(
    people, monkeypatch
):
    alice, bob, room = people
    b, _ = await join(bob, room)
    a, _ = await join(alice, room)
    assert (await receive_until(b, "presence"))["joined"] == "alice"
    state = get_runtime().state
    close = state.socket_close
    close_unreachable(monkeypatch)
    await a.disconnect()
    monkeypatch.setattr(state, "socket_close", close)
    assert not [f for f in await drain(b) if f["type"] == "presence"]
    # Her lease lapses; this process's heartbeat renews bob's and sweeps the room.
    state_clock_ahead(monkeypatch, LAPSED)
    await get_runtime().hub.heartbeat()
    assert await receive_until(b, "presence") == {
        "type": "presence",
        "room": "lobby",
        "left": "alice",
    }
    # Once: the next heartbeat announces nothing, and a join after it comes after it.
    await get_runtime().hub.heartbeat()
    carol = await sync(make_user)("carol")
    c, hello = await join(carol, room)
    assert hello["presence"] == ["bob", "carol"]
    assert (await receive_until(b, "presence"))["joined"] == "carol"
    assert not [f for f in await drain(b) if f["type"] == "presence"]
    await b.disconnect()
    await c.disconnect()


async def test_a_join_announces_the_departures_of_users_whose_leases_lapsed(people, monkeypatch):
    alice, bob, room = people
    a, _ = await join(alice, room)
    state_clock_ahead(monkeypatch, LAPSED - 30)
    b, _ = await join(bob, room)  # bob's lease runs 60 s past alice's
    assert (await receive_until(a, "presence"))["joined"] == "bob"
    state = get_runtime().state
    close = state.socket_close
    close_unreachable(monkeypatch)
    await a.disconnect()
    monkeypatch.setattr(state, "socket_close", close)
    # alice's lease lapses, and carol joins before any heartbeat: her join takes alice out.
    state_clock_ahead(monkeypatch, LAPSED)
    carol = await sync(make_user)("carol")
    c, hello = await join(carol, room)
    assert hello["presence"] == ["bob", "carol"]
    changes = await receive_all(b, "presence", 2)
    assert [_change(f) for f in changes] == [("left", "alice"), ("joined", "carol")]
    assert not [f for f in await drain(c) if f["type"] == "presence"]  # her hello is past it
    await b.disconnect()
    await c.disconnect()


@pytest.mark.redis
@pytest.mark.skipif(not django_settings.REDIS_URL, reason="processes share presence in Redis")
async def test_the_users_of_a_process_that_died_are_announced_gone_by_the_others(people):
    alice, bob, room = people
    b, hello = await join(bob, room)  # bob on this process ("B")
    assert hello["presence"] == ["bob"]
    # Process "A": alice's socket joins there, as its consumer does.
    a_state = RedisState(django_settings.REDIS_URL, django_settings.CHAT_REDIS_PREFIX, 4)
    assert await a_state.socket_open(alice.pk, "a1", 10)
    announce, _, version = (await a_state.presence_join(room.pk, "alice", "a1"))[:3]
    assert announce
    text = frames.presence("lobby", joined="alice")
    await broadcast.apublish(
        broadcast.room_group(room.pk),
        broadcast.presence_event(room.pk, "alice", text, version, exclude_user=alice.pk),
    )
    assert (await receive_until(b, "presence"))["joined"] == "alice"
    # A is killed (no close), and its leases lapse: all a crash leaves in Redis.
    lapsed = {("us", alice.pk): "a1", ("pu", room.pk, "alice"): "a1", ("pr", room.pk): "alice"}
    for key, member in lapsed.items():
        await a_state._redis.zadd(a_state._key(*key), {member: 1.0})
    await a_state.close()
    await get_runtime().hub.heartbeat()  # B's
    assert await receive_until(b, "presence") == {
        "type": "presence",
        "room": "lobby",
        "left": "alice",
    }
    await b.disconnect()


# --- live moderation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "code", "reason"),
    [
        ("remove", 4403, "removed"),
        ("ban", 4403, "banned"),
        ("demote", 4401, "role changed"),
        ("archive", 4404, "room archived"),
        ("deactivate", 4401, "account deactivated"),
        ("make_private", 4403, "forbidden"),
        # Saved by any path (here the shell's): a staff flag lost must not keep its powers (a
        # staff member sees and moderates every room), nor a deleted user their rooms.
        ("unstaff", 4401, "privileges changed"),
        ("delete_user", 4401, "account deleted"),
    ],
)
async def test_moderation_closes_open_sockets_pushed_not_polled(action, code, reason):
    assert django_settings.CHAT_HEARTBEAT > WAIT

    def setup():
        owner, target = make_user("owner"), make_user("target", is_staff=action == "unstaff")
        room = make_room("lobby", owner=owner)
        role = "moderator" if action == "demote" else "member"
        if action != "make_private":
            make_member(room, target, role)
        return owner, target, room

    owner, target, room = await sync(setup)()
    t1, _ = await join(target, room)
    t2, _ = await join(target, room)
    o, _ = await join(owner, room)

    def act():
        if action == "remove":
            services.member_remove(actor=owner, room=room, user=target)
        elif action == "ban":
            services.member_ban(actor=owner, room=room, user=target, reason="spam")
        elif action == "demote":
            services.membership_set_role(actor=owner, room=room, user=target, role="member")
        elif action == "archive":
            services.room_archive(actor=owner, room=room)
        elif action == "deactivate":
            services.user_deactivate(actor=owner, user=target)
        elif action == "make_private":
            services.room_update(actor=owner, room=room, visibility=Room.Visibility.PRIVATE)
        elif action == "unstaff":
            target.is_staff = False
            target.save()
        elif action == "delete_user":
            target.delete()

    await sync(act)()
    for tab in (t1, t2):
        # Pushed: the only timer that closes a socket is chat.hub's heartbeat, every CHAT_HEARTBEAT
        # seconds (more than closed_with waits), and only for its age, with its own reason.
        assert (await closed_with(tab)) == (code, reason)
        await tab.disconnect()
    if action == "archive":
        assert (await closed_with(o))[0] == 4404
    else:
        await send(o, type="ping")
        await receive_until(o, "pong")
    await o.disconnect()
    await get_runtime().audit.flush()
    closes = await sync(
        lambda: list(
            ConnectionLog.objects.filter(username="target").values_list("close_code", flat=True)
        )
    )()
    assert closes == [code, code]


async def test_room_changes_reach_open_sockets_with_each_users_right_to_post(people):
    alice, bob, room = people
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    await sync(services.room_update)(
        actor=alice, room=room, title="Quiet lobby", visibility=Room.Visibility.READ_ONLY
    )
    assert await receive_until(b, "room") == {
        "type": "room",
        "room": "lobby",
        "title": "Quiet lobby",
        "visibility": "read_only",
        "can_post": False,
    }
    assert (await receive_until(a, "room"))["can_post"] is True  # the owner moderates
    await send(b, type="message", body="may I?", client_id="ro1")
    assert (await receive_until(b, "error"))["code"] == "forbidden"
    await a.disconnect()
    await b.disconnect()


async def test_mute_refuses_messages_until_unmuted(people):
    alice, bob, room = people
    b, _ = await join(bob, room)
    until = timezone.now() + timedelta(minutes=10)
    await sync(services.member_mute)(actor=alice, room=room, user=bob, until=until)
    update = await receive_until(b, "membership")
    assert update["muted_until"] is not None
    await send(b, type="message", body="let me speak", client_id="m1")
    assert (await receive_until(b, "error"))["code"] == "muted"
    await send(b, type="typing")
    assert (await receive_until(b, "error"))["code"] == "muted"
    await sync(services.member_mute)(actor=alice, room=room, user=bob, until=None)
    assert (await receive_until(b, "membership"))["muted_until"] is None
    await send(b, type="message", body="thanks", client_id="m2")
    assert (await receive_until(b, "ack"))["seq"] == 1
    await b.disconnect()


def _mute_then_unmute(alice, bob, room) -> None:
    until = timezone.now() + timedelta(minutes=10)
    services.member_mute(actor=alice, room=room, user=bob, until=until)
    services.member_mute(actor=alice, room=room, user=bob, until=None)


def _read_only_then_public(alice, bob, room) -> None:
    services.room_update(actor=alice, room=room, visibility=Room.Visibility.READ_ONLY)
    services.room_update(actor=alice, room=room, visibility=Room.Visibility.PUBLIC)


@pytest.mark.parametrize("changes", [_mute_then_unmute, _read_only_then_public])
async def test_a_membership_or_room_change_older_than_one_applied_is_dropped_on_arrival(
    people, monkeypatch, changes
):
    """Two changes made moments apart on two processes, each published after its own commit,
    can reach a third process in the other order (channels_redis orders a group's messages by
    each publisher's clock). Applied in arrival order, the older would stay: bob's socket would
    refuse his messages as muted, or the room as read-only, when he may post, and his page
    would say so. Each change carries the chain position of its audit row; an older one is
    dropped."""
    alice, bob, room = people
    b, _ = await join(bob, room)
    published: list[tuple[str, dict]] = []
    monkeypatch.setattr(broadcast, "_send", lambda group, event: published.append((group, event)))
    await sync(changes)(alice, bob, room)
    monkeypatch.undo()
    assert len(published) == 2
    for group, event in reversed(published):  # the later change arrives first
        await broadcast.apublish(group, event)
    await send(b, type="message", body="may I?", client_id="c1")
    answer = json.loads(await b.receive_from())
    while answer["type"] not in ("ack", "error"):
        answer = json.loads(await b.receive_from())
    assert (answer["type"], answer.get("seq")) == ("ack", 1)
    await b.disconnect()


async def test_a_change_a_joining_socket_read_is_not_applied_again_after_it(people, monkeypatch):
    """The room was made private and public again while carol's socket joined: after it had
    subscribed, before it read. Its read shows the room public; the changes' events, held
    until hello, must not close it as if the room were still private."""
    alice, _, room = people
    carol = await sync(make_user)("carol")
    load = selectors.socket_context
    changed = []

    def context_after_two_changes(**kwargs):
        if not changed:
            for visibility in (Room.Visibility.PRIVATE, Room.Visibility.PUBLIC):
                changed.append(services.room_update(actor=alice, room=room, visibility=visibility))
        return load(**kwargs)

    monkeypatch.setattr(selectors, "socket_context", context_after_two_changes)
    c, hello = await join(carol, room)
    assert hello["visibility"] == "public"
    frames_after = await drain(c, 0.5)
    assert "__close__" not in [f["type"] for f in frames_after]
    await c.disconnect()


async def test_promotion_takes_effect_live(people):
    alice, bob, room = people
    b, hello = await join(bob, room)
    assert hello["moderator"] is False
    await sync(services.membership_set_role)(actor=alice, room=room, user=bob, role="moderator")
    assert (await receive_until(b, "membership"))["role"] == "moderator"
    await sync(services.message_send)(room=room, author=alice, body="x", client_id="x1")
    await send(b, type="delete", seq=1)
    assert (await receive_until(b, "deleted"))["seq"] == 1
    await b.disconnect()


@pytest.mark.parametrize("how", ["added", "joined"])
async def test_a_visitor_made_a_member_learns_it_on_their_open_socket(how):
    def setup():
        owner, carol = make_user("owner"), make_user("carol")
        room = make_room("news", owner=owner, visibility=Room.Visibility.READ_ONLY)
        return owner, carol, room

    owner, carol, room = await sync(setup)()
    c, hello = await join(carol, room)
    assert (hello["role"], hello["can_post"]) == (None, False)
    if how == "added":
        add = services.membership_add
        await sync(add)(actor=owner, room=room, user=carol, role="moderator")
        role = "moderator"
    else:
        await sync(services.room_join)(user=carol, room=room)
        role = "member"
    assert (await receive_until(c, "membership"))["role"] == role
    await send(c, type="message", body="from the socket", client_id="ws-1")
    frame = {"type": None}
    while frame["type"] not in ("ack", "error"):
        frame = json.loads(await c.receive_from(timeout=WAIT))
    if role == "moderator":  # a read-only room's moderators post
        assert frame == {"type": "ack", "client_id": "ws-1", "seq": 1}
    else:
        assert (frame["type"], frame["code"]) == ("error", "forbidden")
    await c.disconnect()


@pytest.mark.parametrize("change", ["muted", "read-only"])
async def test_a_stored_message_sent_again_after_a_refusal_began_is_acked(people, change):
    """Its ack was lost with the socket; the client sends it again, as the protocol says, once
    the author may no longer post: it is acked with its seq, not refused. A new one is refused."""
    alice, bob, room = people
    b, _ = await join(bob, room)
    await send(b, type="message", body="before", client_id="keep-1")
    assert (await receive_until(b, "ack"))["seq"] == 1
    await b.disconnect()
    if change == "muted":
        until = timezone.now() + timedelta(hours=1)
        await sync(services.member_mute)(actor=alice, room=room, user=bob, until=until)
    else:
        visibility = Room.Visibility.READ_ONLY
        await sync(services.room_update)(actor=alice, room=room, visibility=visibility)
    b, hello = await join(bob, room)
    assert hello["can_post"] is (change == "muted")
    await send(b, type="message", body="before", client_id="keep-1")
    assert json.loads(await b.receive_from()) == {"type": "ack", "client_id": "keep-1", "seq": 1}
    await send(b, type="message", body="after", client_id="new-1")
    refused = await receive_until(b, "error")
    assert (refused["code"], refused["client_id"]) == (
        "muted" if change == "muted" else "forbidden",
        "new-1",
    )
    assert await sync(Message.objects.count)() == 1
    await b.disconnect()


async def test_resending_a_stored_message_while_muted_spends_the_message_rate(people, settings):
    """Each resend reads the database: past the sender's message rate it is refused like any
    frame of a muted sender, and enough refusals close the socket (the abuse limit)."""
    settings.CHAT_MESSAGE_RATE, settings.CHAT_MESSAGE_BURST = 0.01, 3
    settings.CHAT_ABUSE_LIMIT = 2
    alice, bob, room = people
    b, _ = await join(bob, room)
    await send(b, type="message", body="before", client_id="keep-1")
    assert (await receive_until(b, "ack"))["seq"] == 1
    until = timezone.now() + timedelta(hours=1)
    await sync(services.member_mute)(actor=alice, room=room, user=bob, until=until)
    await receive_until(b, "membership")
    answers = []
    for _ in range(2):  # the burst had 3 tokens; the first message took one
        await send(b, type="message", body="before", client_id="keep-1")
        answers.append(json.loads(await b.receive_from())["type"])
    for _ in range(3):
        await send(b, type="message", body="before", client_id="keep-1")
    refused = [json.loads(await b.receive_from()) for _ in range(3)]
    assert answers == ["ack", "ack"]
    assert [(f["type"], f["code"]) for f in refused] == [("error", "muted")] * 3
    assert (await closed_with(b))[0] == 4429
    await b.disconnect()


async def test_a_ban_racing_an_open_socket_still_stops_the_message(people):
    """The socket's cached membership is briefly stale; the service re-checks in its transaction."""
    _, bob, room = people
    b, _ = await join(bob, room)
    await sync(Membership.objects.filter(room=room, user=bob).update)(banned_at=timezone.now())
    await send(b, type="message", body="sneaky", client_id="s1")
    assert (await receive_until(b, "error"))["code"] == "forbidden"
    assert await sync(Message.objects.count)() == 0
    await b.disconnect()


# --- limits ---------------------------------------------------------------------------------------


async def test_message_rate_is_limited_across_the_users_sockets(people, settings):
    settings.CHAT_MESSAGE_RATE, settings.CHAT_MESSAGE_BURST = 0.01, 3
    alice, _, room = people
    tab1, _ = await join(alice, room)
    tab2, _ = await join(alice, room)
    for i, tab in enumerate([tab1, tab2, tab1]):
        await send(tab, type="message", body="hi", client_id=f"ok{i}")
        await receive_until(tab, "ack")
    await send(tab2, type="message", body="too many", client_id="nope")
    error = await receive_until(tab2, "error")
    assert (error["code"], error["client_id"]) == ("rate_limited", "nope")
    await tab1.disconnect()
    await tab2.disconnect()


async def test_repeated_abuse_closes_4429_and_is_audited(people, settings):
    settings.CHAT_ABUSE_LIMIT = 5
    alice, _, room = people
    a, _ = await join(alice, room)
    for _ in range(5):  # tolerated
        await a.send_to(text_data="garbage")
    await send(a, type="ping")
    assert (await receive_until(a, "pong"))["type"] == "pong"
    await a.send_to(text_data="garbage")  # one more than the limit
    assert (await closed_with(a))[0] == 4429
    await a.disconnect()
    await get_runtime().audit.flush()
    from chat.models import SecurityEvent

    event = await sync(SecurityEvent.objects.get)(event="rate_limited")
    assert event.target_name == "alice"


async def test_sockets_per_user_are_capped(people, settings):
    settings.CHAT_MAX_SOCKETS_PER_USER = 2
    alice, _, room = people
    first, _ = await join(alice, room)
    second, _ = await join(alice, room)
    from tests.factories import make_ticket
    from tests.ws import communicator

    token = await sync(make_ticket)(alice, room)
    third = communicator("/ws/rooms/lobby/", ticket=token)
    assert (await third.connect())[0]
    assert (await closed_with(third))[0] == 4429
    await third.disconnect()
    await first.disconnect()
    fourth, _ = await join(alice, room)  # a slot is free again
    await fourth.disconnect()
    await second.disconnect()
    await get_runtime().audit.flush()
    reasons = await sync(lambda: list(ConnectionLog.objects.values_list("reason", flat=True)))()
    assert reasons.count("too_many_connections") == 1


async def test_connection_attempts_per_ip_are_limited(people, settings):
    settings.CHAT_CONNECT_RATE_PER_IP = 3
    from tests.ws import communicator

    codes = []
    for _ in range(4):
        comm = communicator("/ws/rooms/lobby/", ticket="garbage", ip="198.51.100.77")
        await comm.connect()
        codes.append((await closed_with(comm))[0])
        await comm.disconnect()
    assert codes == [4401, 4401, 4401, 4429]


@pytest.mark.parametrize(
    ("addresses", "last_code"),
    [
        # One client, a new address of its IPv6 /64 for every attempt: still one client.
        (["2001:db8::1", "2001:db8::2", "2001:db8::a:3", "2001:db8::ffff:4"], 4429),
        (["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"], 4401),
        (["2001:db8:0:1::1", "2001:db8:0:2::1", "2001:db8:0:3::1", "2001:db8:0:4::1"], 4401),
    ],
    ids=["ipv6-one-network", "ipv4-addresses", "ipv6-networks"],
)
async def test_connection_attempts_are_limited_per_ipv6_network(
    people, settings, addresses, last_code
):
    settings.CHAT_CONNECT_RATE_PER_IP = 3
    from tests.ws import communicator

    codes = []
    for address in addresses:
        comm = communicator("/ws/rooms/lobby/", ticket="garbage", ip=address)
        await comm.connect()
        codes.append((await closed_with(comm))[0])
        await comm.disconnect()
    assert codes == [4401, 4401, 4401, last_code]


@pytest.mark.parametrize(
    ("addresses", "alert"),
    [
        (["198.51.100.7"] * 3, ("IP 198.51.100.7", {})),
        # One client rotating through its /64: one network, as the limits count it.
        (
            ["2001:db8::1", "2001:db8::2", "2001:db8::a:3"],
            ("network 2001:db8::/64", {"network": "2001:db8::/64"}),
        ),
        (["198.51.100.1", "198.51.100.2", "198.51.100.3"], None),
    ],
    ids=["ipv4-address", "ipv6-one-network", "ipv4-addresses"],
)
async def test_rejected_attempts_over_the_threshold_raise_an_alert_per_client(
    people, settings, caplog, addresses, alert
):
    from chat.models import SecurityEvent
    from tests.ws import communicator

    settings.CHAT_SECURITY_ALERT_THRESHOLD, settings.CHAT_SECURITY_ALERT_WINDOW = 3, 60
    for address in addresses:
        comm = communicator("/ws/rooms/lobby/", ticket="garbage", ip=address)
        await comm.connect()
        assert (await closed_with(comm))[0] == 4401
        await comm.disconnect()
    await get_runtime().audit.flush()

    rows = await sync(
        lambda: list(SecurityEvent.objects.filter(event="alert").values("ip", "details"))
    )()
    warnings = [r.getMessage() for r in caplog.records if r.name == "chat.security"]
    if alert is None:
        assert rows == []
        assert not [w for w in warnings if "rejected WebSocket attempts" in w]
        return
    who, extra = alert
    assert rows == [{"ip": addresses[-1], "details": {"count": 3, "window_seconds": 60, **extra}}]
    assert f"{who} had 3 rejected WebSocket attempts within 60s" in warnings


async def test_connections_older_than_the_maximum_age_close_4401(people, settings):
    alice, _, room = people
    a, _ = await join(alice, room)
    settings.CHAT_MAX_CONNECTION_AGE = 0
    await get_runtime().hub.heartbeat()
    code, reason = await closed_with(a)
    assert (code, reason) == (4401, "session expired")
    await a.disconnect()


# --- resume ---------------------------------------------------------------------------------------


async def test_reconnect_after_100_messages_misses_nothing_and_sees_nothing_twice(people, settings):
    settings.CHAT_MESSAGE_BURST = 1000
    alice, bob, room = people
    b, hello = await join(bob, room)
    max_seq = hello["last_seq"]
    await b.disconnect()

    a, _ = await join(alice, room)
    for i in range(100):
        await send(a, type="message", body=f"n{i}", client_id=f"n{i}")
    for _ in range(100):
        await receive_until(a, "ack")

    b, hello = await join(bob, room)
    assert hello["last_seq"] == 100
    received = []
    after = max_seq
    while True:
        await send(b, type="history", after=after, limit=30)
        page = await receive_until(b, "history")
        received += page["messages"]
        after = page["messages"][-1]["seq"] if page["messages"] else after
        if not page["has_more"]:
            break
    seqs = [m["seq"] for m in received]
    assert seqs == list(range(1, 101))
    assert [m["body"] for m in received] == [f"n{i}" for i in range(100)]
    await a.disconnect()
    await b.disconnect()


async def test_live_messages_after_hello_arrive_once_in_order(people, settings):
    settings.CHAT_MESSAGE_BURST = 1000
    alice, bob, room = people
    b, hello = await join(bob, room)
    a, _ = await join(alice, room)
    await asyncio.gather(
        *(send(a, type="message", body=str(i), client_id=f"l{i}") for i in range(30))
    )
    live = [f["seq"] for f in await receive_all(b, "message", 30)]
    assert live == list(range(hello["last_seq"] + 1, hello["last_seq"] + 31))
    assert not [f for f in await drain(b) if f["type"] == "message"]
    await a.disconnect()
    await b.disconnect()


async def test_hub_fills_gaps_from_the_database_in_order(people):
    """Events can arrive out of order or not at all; sockets still see 1, 2, 3 once each."""
    alice, bob, room = people
    b, _ = await join(bob, room)

    def store(n):
        # Stored without publishing, as if the channel layer had lost the events.
        for i in range(1, n + 1):
            Message.objects.create(room=room, seq=i, author=alice, body=f"g{i}", client_id=f"g{i}")
        Room.objects.filter(pk=room.pk).update(last_seq=n)

    await sync(store)(3)
    text = frames.message(
        {
            "seq": 3,
            "room": "lobby",
            "author": "alice",
            "body": "g3",
            "created_at": "",
            "client_id": "g3",
        }
    )
    event = broadcast.messages_event(room.pk, [(3, text)])
    await broadcast.apublish(broadcast.room_group(room.pk), event)  # 3 arrives; 1 and 2 never do
    await broadcast.apublish(broadcast.room_group(room.pk), event)  # and 3 again
    received = await receive_all(b, "message", 3)
    assert [(f["seq"], f["body"]) for f in received] == [(1, "g1"), (2, "g2"), (3, "g3")]
    assert not [f for f in await drain(b, timeout=GAP_WAIT + 0.2) if f["type"] == "message"]
    await b.disconnect()


# --- audit of a whole connection ------------------------------------------------------------------


async def test_connection_log_records_the_whole_session(people):
    alice, _, room = people
    a, _ = await join(alice, room, headers=[(b"user-agent", b"pytest-agent")])
    await send(a, type="message", body="one", client_id="x1")
    await receive_until(a, "ack")
    await receive_until(a, "message")  # through Redis it may come after a pong
    await send(a, type="ping")
    await receive_until(a, "pong")
    await a.disconnect(code=1000)
    await get_runtime().audit.flush()
    row = await sync(ConnectionLog.objects.get)()
    assert (row.outcome, row.username, row.room_slug, row.ip) == (
        "accepted",
        "alice",
        "lobby",
        "127.0.0.1",
    )
    assert (row.origin, row.user_agent, row.transport) == (
        "http://testserver",
        "pytest-agent",
        "subprotocol",
    )
    assert row.close_code == 1000
    assert row.closed_at is not None
    assert row.messages_received == 2
    assert row.messages_sent == 4  # hello, ack, the message broadcast, pong
    assert row.instance
    sent = await sync(MessageLog.objects.get)(event="sent")
    assert (sent.seq, sent.connection_id, sent.username) == (1, row.id, "alice")


async def test_an_open_socket_lets_go_of_its_handshake_headers_once_they_are_read(people):
    alice, _, room = people
    cookie = b"sessionid=SECRET-SESSION-COOKIE; csrftoken=abc"
    comm, hello = await join(
        alice, room, headers=[(b"cookie", cookie), (b"user-agent", b"TestBrowser/1.0")]
    )
    assert hello["user"] == "alice"
    # The scope the frames above the consumer hold for the socket's life: no headers, so no
    # cookie; what was read from them at connect is kept where it is needed.
    assert "headers" not in comm.scope
    assert b"SECRET-SESSION-COOKIE" not in repr(comm.scope).encode()
    await send(comm, type="message", body="hi", client_id="c-1")
    await receive_until(comm, "ack")
    await comm.disconnect()
    await get_runtime().audit.flush()
    row = await sync(ConnectionLog.objects.get)(username="alice")
    assert (row.user_agent, row.origin) == ("TestBrowser/1.0", "http://testserver")


async def test_an_open_socket_keeps_its_state_in_slots(people):
    # CPython gives an instance with more attribute names than it shares (30) a dict of its
    # own, 1.6 KB: RoomConsumer declares its state in __slots__. An attribute added without its
    # slot lands in the instance dict, and this fails.
    alice, bob, room = people
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    await send(a, type="message", body="hi", client_id="c-1")
    await receive_until(b, "message")
    gc.collect()
    # type(), not isinstance(): isinstance() on a dead weak proxy among the objects raises.
    consumers = [o for o in gc.get_objects() if type(o) is RoomConsumer]
    # Ours, and any an earlier test left for the collector: the rule holds for every one.
    assert {"alice", "bob"} <= {getattr(c, "username", None) for c in consumers}
    for consumer in consumers:
        assert set(vars(consumer)) <= {"groups"}  # channels' own, set in __init__
    await a.disconnect()
    await b.disconnect()
