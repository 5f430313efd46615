"""The socket side when things go wrong: races in the hub, backing-service failures, bad data
that only the database notices. Each case once lost messages, leaked state or killed a socket."""

import asyncio
import contextlib
import json
import threading
from datetime import timedelta

import pytest
from django.db import DataError, OperationalError
from django.utils import timezone

from chat import broadcast, frames, selectors, services
from chat import hub as hub_module
from chat.hub import GAP_WAIT
from chat.models import Message, Room
from chat.runtime import get_runtime
from chat.services import SendItem
from chat.state import StateUnavailable
from tests.chat.helpers import drain, drop_publications, join, receive_all, send, sync
from tests.factories import make_member, make_ticket, make_user
from tests.wait import eventually, eventually_sync
from tests.ws import WAIT, closed_with, communicator, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


def _frame(seq: int) -> str:
    return frames.message(
        {
            "seq": seq,
            "room": "lobby",
            "author": "alice",
            "body": f"m{seq}",
            "created_at": "",
            "client_id": f"m{seq}",
        }
    )


def _store(room, author, first: int, last: int) -> None:
    """Messages stored without being published: what the hub sees when a publication is late."""
    for seq in range(first, last + 1):
        Message.objects.create(
            room=room, seq=seq, author=author, body=f"m{seq}", client_id=f"m{seq}"
        )
    Room.objects.filter(pk=room.pk).update(last_seq=last)


async def test_a_late_publication_during_a_gap_fill_does_not_stall_the_room(people, monkeypatch):
    alice, bob, room = people
    b, _ = await join(bob, room)
    await sync(_store)(room, alice, 1, 2)
    read = selectors.message_frames_between
    reading = threading.Event()
    hub = get_runtime().hub

    def slow_read(*args):
        reading.set()
        # The fill reads until seq 1's own publication has arrived (parked while it fills).
        eventually_sync(lambda: 1 in hub.rooms[room.pk].pending, "seq 1 parked during the fill")
        return read(*args)

    monkeypatch.setattr(selectors, "message_frames_between", slow_read)
    group = broadcast.room_group(room.pk)
    await broadcast.apublish(group, broadcast.messages_event(room.pk, [(2, _frame(2))]))
    # The fill of seq 1 (after GAP_WAIT) is reading the database now...
    assert await asyncio.to_thread(reading.wait, WAIT)
    # ... when seq 1's own publication arrives: the fill delivers it, its live copy is stale.
    await broadcast.apublish(group, broadcast.messages_event(room.pk, [(1, _frame(1))]))
    first = [f["seq"] for f in await receive_all(b, "message", 2)]
    assert not [f for f in await drain(b) if f["type"] == "message"]
    feed = get_runtime().hub.rooms[room.pk]
    assert (first, feed.pending, feed.delivered) == ([1, 2], {}, 2)

    monkeypatch.setattr(selectors, "message_frames_between", read)
    await sync(_store)(room, alice, 3, 4)  # 3 is never published: a real gap, filled again
    await broadcast.apublish(group, broadcast.messages_event(room.pk, [(4, _frame(4))]))
    later = [f["seq"] for f in await receive_all(b, "message", 2)]
    assert later == [3, 4]
    assert not [f for f in await drain(b, timeout=GAP_WAIT + 0.2) if f["type"] == "message"]
    await b.disconnect()


@pytest.mark.parametrize(
    "client_id",
    ["x" * 64 + "\n", "ok\n", "\nok", "x" * 65, "", "a b", "é"],
    ids=["64-and-newline", "trailing-newline", "leading-newline", "65", "empty", "space", "accent"],
)
async def test_malformed_client_ids_are_refused_before_the_database(people, client_id):
    alice, _, room = people
    a, _ = await join(alice, room)
    await send(a, type="message", body="hello", client_id=client_id)
    error = await receive_until(a, "error")
    assert error["code"] == "invalid_frame"
    assert "client_id" not in error  # never echo an id that is not valid
    assert await sync(Message.objects.count)() == 0
    await a.disconnect()


async def test_a_message_the_database_refuses_costs_no_other_message_its_place(people, monkeypatch):
    alice, bob, room = people
    store = services.message_store_many

    def refuse_bad_data(items):
        if any(item.body == "bad" for item in items):
            raise DataError("value too long")  # what PostgreSQL says of data it cannot take
        return store(items)

    monkeypatch.setattr(services, "message_store_many", refuse_bad_data)
    replies: dict[str, dict] = {}

    def reply_to(name):
        async def reply(text):
            replies[name] = json.loads(text)

        return reply

    writer = get_runtime().writer
    futures = [
        writer.submit(SendItem(room, alice, "one", "a1"), reply_to("a1")),
        writer.submit(SendItem(room, bob, "bad", "b1"), reply_to("b1")),
        writer.submit(SendItem(room, alice, "two", "a2"), reply_to("a2")),
    ]
    await asyncio.gather(*futures)
    assert replies["a1"] == {"type": "ack", "client_id": "a1", "seq": 1}
    assert replies["a2"] == {"type": "ack", "client_id": "a2", "seq": 2}
    assert (replies["b1"]["type"], replies["b1"]["code"]) == ("error", "unavailable")
    stored = await sync(lambda: list(Message.objects.order_by("seq").values_list("body", "seq")))()
    assert stored == [("one", 1), ("two", 2)]


async def test_a_failed_attach_leaves_nothing_in_the_hub(people, monkeypatch):
    alice, _, room = people
    read = selectors.socket_context  # the hub's first read of the room, inside attach
    calls = []

    def flaky(**where):
        calls.append(where)
        if len(calls) == 1:
            raise OperationalError("database went away")
        return read(**where)

    monkeypatch.setattr(selectors, "socket_context", flaky)
    hub = get_runtime().hub
    left, discard = [], hub.layer.group_discard

    async def recorded(group, channel):
        left.append((group, channel))
        await discard(group, channel)

    monkeypatch.setattr(hub.layer, "group_discard", recorded)
    comm = communicator("/ws/rooms/lobby/", ticket=await sync(make_ticket)(alice, room))
    await comm.connect()
    assert (await closed_with(comm))[0] == 1013
    await comm.disconnect()
    assert (dict(hub.users), hub.rooms) == ({}, {})
    # Nor a subscription: the process left the room's group it had joined for that socket.
    assert (broadcast.room_group(room.pk), hub.channel) in left
    again, hello = await join(alice, room)  # and the next socket works
    assert hello["type"] == "hello"
    await again.disconnect()


async def test_a_failed_read_of_a_room_s_second_socket_leaves_the_first_one_served(
    people, monkeypatch
):
    alice, bob, room = people
    a, _ = await join(alice, room)
    read = selectors.socket_context

    def failing(**where):
        raise OperationalError("database went away")

    monkeypatch.setattr(selectors, "socket_context", failing)
    comm = communicator("/ws/rooms/lobby/", ticket=await sync(make_ticket)(bob, room))
    await comm.connect()
    assert (await closed_with(comm))[0] == 1013
    await comm.disconnect()
    monkeypatch.setattr(selectors, "socket_context", read)
    hub = get_runtime().hub
    assert [s.user_id for s in hub.rooms[room.pk].sockets.values()] == [alice.pk]
    await send(a, type="message", body="still here", client_id="c1")
    assert (await receive_until(a, "message"))["body"] == "still here"
    await a.disconnect()


@pytest.mark.parametrize(
    ("frame", "target", "name"),
    [
        ({"type": "history", "limit": 10}, selectors, "messages_page"),
        ({"type": "delete", "seq": 1}, services, "message_delete"),
    ],
    ids=["history", "delete"],
)
async def test_a_database_error_answers_unavailable_and_keeps_the_socket(
    people, monkeypatch, frame, target, name
):
    alice, _, room = people
    a, _ = await join(alice, room)

    def fail(**kwargs):
        raise OperationalError("database went away")

    monkeypatch.setattr(target, name, fail)
    await send(a, **frame)
    error = await receive_until(a, "error")
    assert error["code"] == "unavailable"
    await send(a, type="ping")
    assert (await receive_until(a, "pong"))["type"] == "pong"
    await a.disconnect()


@pytest.mark.parametrize("failure", ["rate", "resend-read"])
async def test_a_message_answered_unavailable_names_its_client_id(people, monkeypatch, failure):
    """docs/protocol.md: `unavailable` with a client_id means that message was not stored,
    send it again; without one, the client cannot tell which of its messages to resend."""
    alice, bob, room = people
    b, _ = await join(bob, room)
    if failure == "rate":

        async def unreachable(*args):
            raise StateUnavailable("the shared state is unreachable")

        monkeypatch.setattr(get_runtime().state, "take_token", unreachable)
    else:  # muted since: a resend is looked up in the database, which fails

        def fail(**kwargs):
            raise OperationalError("database went away")

        until = timezone.now() + timedelta(minutes=5)
        await sync(services.member_mute)(actor=alice, room=room, user=bob, until=until)
        await receive_until(b, "membership")
        monkeypatch.setattr(selectors, "message_seq_of", fail)
    await send(b, type="message", body="hello", client_id="c-1")
    error = await receive_until(b, "error")
    assert (error["code"], error.get("client_id")) == ("unavailable", "c-1")
    await b.disconnect()


async def test_a_change_made_while_joining_is_in_hello_not_in_a_frame_before_it(
    people, monkeypatch
):
    alice, bob, room = people
    load = selectors.socket_context
    muted = []
    hub = get_runtime().hub

    def context_after_a_mute(**kwargs):
        if not muted:
            until = timezone.now() + timedelta(minutes=5)
            muted.append(services.member_mute(actor=alice, room=room, user=bob, until=until))
            # The hub hears of the mute before this socket is ready: it keeps the event until
            # this read ends (chat.hub: a feed's early events).
            eventually_sync(lambda: hub.rooms[room.pk].early, "the hub heard of the mute")
        return load(**kwargs)

    monkeypatch.setattr(selectors, "socket_context", context_after_a_mute)
    comm = communicator("/ws/rooms/lobby/", ticket=await sync(make_ticket)(bob, room))
    assert (await comm.connect())[0]
    hello = json.loads(await comm.receive_from())
    assert hello["type"] == "hello"
    assert hello["muted_until"] is not None
    assert [f for f in await drain(comm) if f["type"] == "membership"] == []
    await comm.disconnect()


async def test_a_socket_joining_while_the_last_one_leaves_still_gets_live_messages(
    people, monkeypatch
):
    """The leaver's unsubscribe can land after the joiner's subscribe (two Redis commands)."""
    alice, bob, room = people
    leaving, _ = await join(alice, room)
    hub = get_runtime().hub
    discard = hub.layer.group_discard

    discarding = asyncio.Event()

    async def late_discard(group, channel):
        if group == broadcast.room_group(room.pk):
            discarding.set()
            # The joiner's subscribe, if the hub sent it now, would land first.
            with contextlib.suppress(AssertionError):
                await eventually(lambda: _ready_in(hub, room), "bob's socket is open", 0.5)
        await discard(group, channel)

    monkeypatch.setattr(hub.layer, "group_discard", late_discard)
    left = asyncio.create_task(leaving.disconnect())
    await asyncio.wait_for(discarding.wait(), WAIT)  # alice's socket is unsubscribing now
    joining, _ = await join(bob, room)
    await left  # the late unsubscribe has landed
    await sync(services.message_send)(author=alice, room=room, body="still there?", client_id="c1")
    frame = await receive_until(joining, "message")
    assert frame["body"] == "still there?"
    await joining.disconnect()


async def test_a_room_s_last_message_whose_publication_was_lost_still_reaches_its_sockets(
    people, monkeypatch
):
    """channels_redis drops a group message for a channel over its capacity (an INFO log), a
    publication can fail (the writer logs it), a process can die between its commit and its
    publication: "correctness never rests on the layer" (docs/deploy.md), the hub fills a gap
    from the database. But it sees a gap only when a later message arrives, and the room's last
    message has none: in a quiet room the others would never see it on their open sockets. The
    hub's heartbeat (every HEARTBEAT seconds) catches up with what its rooms have stored."""
    alice, bob, room = people
    a, _ = await join(alice, room)
    b, _ = await join(bob, room)
    publish = broadcast.apublish

    async def lost_in_the_layer(group, event):
        if event["type"] != "hub.messages":
            await publish(group, event)

    monkeypatch.setattr(broadcast, "apublish", lost_in_the_layer)
    await send(a, type="message", body="hello?", client_id="c1")
    assert (await receive_until(a, "ack"))["seq"] == 1
    monkeypatch.setattr(broadcast, "apublish", publish)
    await get_runtime().hub.heartbeat()
    [message] = await receive_all(b, "message", 1)
    assert (message["seq"], message["body"]) == (1, "hello?")
    await a.disconnect()
    await b.disconnect()


def _ready_in(hub, room) -> bool:
    """Whether a socket of `room` is open on this process's hub (not one closing)."""
    feed = hub.rooms.get(room.pk)
    return feed is not None and any(s.ready and not s.closing for s in feed.sockets.values())


def _ban_bob(alice, bob, room) -> None:
    services.member_ban(actor=alice, room=room, user=bob)


def _change_alice_s_password(alice, bob, room) -> None:
    alice.set_password("a-new-password-that-is-long")
    alice.save()


@pytest.mark.parametrize(
    ("joiner", "group", "change", "code"),
    [
        ("bob", "room", _ban_bob, 4403),
        ("alice", "user", _change_alice_s_password, 4401),
    ],
)
async def test_a_change_published_while_the_hub_leaves_and_rejoins_a_group_still_closes(
    people, monkeypatch, joiner, group, change, code
):
    """alice's socket, the last here of her room and of her user, closes (the hub unsubscribes
    from their groups) as the joiner's opens (the hub subscribes again). Sent while the
    unsubscribe is unanswered, the joiner's subscribe can land first (two connections of the
    layer's pool): then, until the hub subscribes again, the group's events pass this process
    by, and a ban or a revocation published in that moment, after the joiner's socket read its
    state, would leave it open on the room. The hub sends one change of a group's subscription
    at a time, each once the one before has been answered."""
    alice, bob, room = people
    user = {"alice": alice, "bob": bob}[joiner]
    leaving, _ = await join(alice, room)
    hub = get_runtime().hub
    layer = hub.layer
    name = broadcast.room_group(room.pk) if group == "room" else broadcast.user_group(alice.pk)
    group_discard = layer.group_discard
    discarding = asyncio.Event()

    async def discard_landing_late(group_name, channel):
        if group_name != name:
            return await group_discard(group_name, channel)
        discarding.set()
        # Whatever the hub sends for the joiner's socket meanwhile lands before this discard.
        with contextlib.suppress(AssertionError):
            await eventually(lambda: _ready_in(hub, room), "the joiner's socket is open", 1.0)
        await group_discard(group_name, channel)
        # Before the discard's answer: the change, committed and published.
        await sync(change)(alice, bob, room)
        return None

    monkeypatch.setattr(layer, "group_discard", discard_landing_late)
    left = asyncio.create_task(leaving.disconnect())
    await asyncio.wait_for(discarding.wait(), WAIT)
    joining = communicator("/ws/rooms/lobby/", ticket=await sync(make_ticket)(user, room))
    assert (await joining.connect())[0]
    await left
    assert (await closed_with(joining))[0] == code
    await joining.disconnect()


# --- changes whose live event was lost -----------------------------------------------------------


def _ban(owner, user, room) -> None:
    services.member_ban(actor=owner, room=room, user=user)


def _remove(owner, user, room) -> None:
    services.member_remove(actor=owner, room=room, user=user)


def _mute(owner, user, room) -> None:
    until = timezone.now() + timedelta(minutes=10)
    services.member_mute(actor=owner, room=room, user=user, until=until)


def _change_password(owner, user, room) -> None:
    user.set_password("a-new-password-that-is-long")
    user.save()


def _archive(owner, user, room) -> None:
    services.room_archive(actor=owner, room=room)


@pytest.mark.parametrize(
    ("change", "lost", "closed"),
    [
        pytest.param(_ban, "hub.membership", (4403, "banned"), id="ban"),
        pytest.param(_remove, "hub.membership", (4403, "removed"), id="removal"),
        pytest.param(_change_password, "hub.revoke", (4401, "password changed"), id="password"),
        pytest.param(_archive, "hub.revoke", (4404, "room archived"), id="archive"),
        pytest.param(_mute, "hub.membership", (4401, "state changed"), id="mute"),
    ],
)
async def test_a_change_whose_event_was_lost_closes_the_socket_at_the_heartbeat(
    people, monkeypatch, change, lost, closed
):
    """A ban or a revocation reaches a socket only as an event, which the layer may lose; the
    heartbeat finds the change in the audit trail and closes the socket as the event would
    have (a change of state only, like a mute, 4401: the client reconnects and reads it)."""
    alice, bob, room = people
    b, _ = await join(bob, room)
    drop_publications(monkeypatch, lost)
    await sync(change)(alice, bob, room)
    assert await b.receive_nothing(timeout=0.2)  # the live event never came
    await get_runtime().hub.heartbeat()
    assert await closed_with(b) == closed
    await b.disconnect()


async def test_a_socket_closed_for_a_lost_mute_reads_the_mute_as_it_reconnects(people, monkeypatch):
    alice, bob, room = people
    b, hello = await join(bob, room)
    assert hello["muted_until"] is None
    drop_publications(monkeypatch, "hub.membership")
    await sync(_mute)(alice, bob, room)
    await get_runtime().hub.heartbeat()
    assert await closed_with(b) == (4401, "state changed")
    await b.disconnect()
    again, hello = await join(bob, room)
    assert hello["muted_until"] is not None
    await again.disconnect()


async def _bob_and_carol_in(room, bob):
    """bob's socket and a socket of carol's, a new member, in `room`; and carol."""
    carol = await sync(make_user)("carol")
    await sync(make_member)(room, carol)
    b, _ = await join(bob, room)
    c, _ = await join(carol, room)
    return b, c, carol


async def _still_open(comm) -> None:
    await send(comm, type="ping")
    await receive_until(comm, "pong")  # a close before it fails this


async def test_a_change_a_socket_had_live_does_not_close_it_at_the_heartbeat(people, monkeypatch):
    """bob's mute reaches his socket; carol's is lost: the heartbeat closes hers alone."""
    alice, bob, room = people
    b, c, carol = await _bob_and_carol_in(room, bob)
    await sync(_mute)(alice, bob, room)
    assert (await receive_until(b, "membership"))["muted_until"] is not None
    drop_publications(monkeypatch, "hub.membership")
    await sync(_mute)(alice, carol, room)
    await get_runtime().hub.heartbeat()
    assert await closed_with(c) == (4401, "state changed")
    await _still_open(b)
    await get_runtime().hub.heartbeat()
    await _still_open(b)
    await b.disconnect()
    await c.disconnect()


async def test_a_socket_opened_after_a_lost_change_is_not_closed_for_it(people, monkeypatch):
    alice, bob, room = people
    older, _ = await join(bob, room)
    drop_publications(monkeypatch, "hub.membership")
    await sync(_mute)(alice, bob, room)
    newer, hello = await join(bob, room)
    assert hello["muted_until"] is not None
    await get_runtime().hub.heartbeat()
    assert await closed_with(older) == (4401, "state changed")
    await _still_open(newer)
    await older.disconnect()
    await newer.disconnect()


async def test_the_first_socket_here_is_not_closed_for_a_change_lost_before_it(people, monkeypatch):
    """bob's lost mute, older than the state his socket (the process's first) read, is in his
    hello and closes nothing; carol's, later, closes hers."""
    alice, bob, room = people
    carol = await sync(make_user)("carol")
    await sync(make_member)(room, carol)
    drop_publications(monkeypatch, "hub.membership")
    await sync(_mute)(alice, bob, room)
    b, _ = await join(bob, room)
    c, _ = await join(carol, room)
    await sync(_mute)(alice, carol, room)
    await get_runtime().hub.heartbeat()
    assert await closed_with(c) == (4401, "state changed")
    await _still_open(b)
    await b.disconnect()
    await c.disconnect()


def _add_to_a_group(user):
    from django.contrib.auth.models import Group

    user.groups.add(Group.objects.create(name="helpdesk"))


def _make_staff(user):
    user.is_staff = True
    user.save()


@pytest.mark.parametrize(
    ("change", "closed"),
    [(_add_to_a_group, None), (_make_staff, (4401, "privileges changed"))],
    ids=["group", "staff-flag"],
)
async def test_only_a_lost_privilege_change_that_closes_live_closes_at_the_heartbeat(
    people, monkeypatch, change, closed
):
    """Both are audited as privileges changed; a group (or a permission) closes no socket live,
    a staff flag does (a socket acts with the flags it opened with). The heartbeat's recovery
    must close only what the live event would have."""
    _, bob, room = people
    b, _ = await join(bob, room)
    drop_publications(monkeypatch, "hub.revoke")
    await sync(change)(bob)
    await get_runtime().hub.heartbeat()
    if closed is None:
        await _still_open(b)
    else:
        assert await closed_with(b) == closed
    await b.disconnect()


def _log_out(user, credential):
    services.user_logged_out(user=user, credential=credential, method="session", ip=None)


def _reuse_a_refresh_token(user, credential):
    services.refresh_token_reused(user=user, credential=credential, ip=None)


@pytest.mark.parametrize(
    ("end_login", "reason"),
    [(_log_out, "logged out"), (_reuse_a_refresh_token, "login ended")],
    ids=["logout", "refresh-reused"],
)
async def test_a_lost_end_of_a_login_closes_the_sockets_of_that_login_only(
    people, monkeypatch, end_login, reason
):
    _, bob, room = people
    ended, _ = await join(bob, room, credential="session:ended")
    other, _ = await join(bob, room, credential="session:other")
    drop_publications(monkeypatch, "hub.revoke")
    await sync(end_login)(bob, "session:ended")
    await get_runtime().hub.heartbeat()
    assert await closed_with(ended) == (4401, reason)
    await _still_open(other)
    await ended.disconnect()
    await other.disconnect()


async def test_changes_beyond_a_heartbeat_s_share_are_read_at_the_next(people, monkeypatch):
    alice, bob, room = people
    b, c, carol = await _bob_and_carol_in(room, bob)
    monkeypatch.setattr(hub_module, "CHANGES_PER_HEARTBEAT", 1)
    drop_publications(monkeypatch, "hub.membership")
    await sync(_mute)(alice, bob, room)
    await sync(_mute)(alice, carol, room)
    hub = get_runtime().hub
    await hub.heartbeat()
    assert await closed_with(b) == (4401, "state changed")
    await _still_open(c)
    await hub.heartbeat()
    assert await closed_with(c) == (4401, "state changed")
    await b.disconnect()
    await c.disconnect()
