"""Writes that race each other on the database: each interleaving is forced (a hook holds one
writer at the point the race needs), so a test fails every time the code allows the race."""

import asyncio
import contextlib
import json
import threading
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.utils import timezone

from chat import broadcast, services, sql
from chat.models import Membership, Message, MessageLog, Room, SecurityEvent
from tests.chat.helpers import join, send, sync
from tests.factories import make_member, make_room, make_user
from tests.wait import eventually_sync
from tests.ws import WAIT

pytestmark = pytest.mark.django_db(transaction=True)

# How long a held writer waits for the other to commit: long enough for a moderation that is
# not blocked by the held writer to commit, short enough for one that is to be waited out.
HOLD = 2.0


def in_thread(name: str, target, *args):
    """Run `target` in a thread (named `name`) with a database connection of its own; the
    function returned joins it and gives its result."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = target(*args)
        except Exception as error:  # raised again by the join
            outcome["error"] = error
        finally:
            connection.close()

    thread = threading.Thread(target=run, name=name)
    thread.start()

    def join():
        thread.join(WAIT)
        assert not thread.is_alive(), "the thread did not finish"
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    return join


def ban(room, actor, user):
    services.member_ban(actor=actor, room=room, user=user)


def kick(room, actor, user):
    services.member_remove(actor=actor, room=room, user=user)


def mute(room, actor, user):
    until = timezone.now() + timedelta(days=1)
    services.member_mute(actor=actor, room=room, user=user, until=until)


def demote(room, actor, user):
    services.membership_set_role(actor=actor, room=room, user=user, role="member")


def make_read_only(room, actor, user):
    services.room_update(actor=actor, room=room, visibility="read_only")


def moderation_event(sanction) -> str:
    return {
        ban: SecurityEvent.Event.MEMBER_BANNED,
        kick: SecurityEvent.Event.MEMBER_REMOVED,
        mute: SecurityEvent.Event.MEMBER_MUTED,
        demote: SecurityEvent.Event.ROLE_CHANGED,
        make_read_only: SecurityEvent.Event.ROOM_UPDATED,
    }[sanction]


@pytest.mark.parametrize(
    ("visibility", "role", "sanction"),
    [
        ("public", "member", ban),
        ("public", None, ban),  # an outsider posting in a public room: no membership row yet
        ("private", "member", kick),
        ("public", "member", mute),
        ("read_only", "moderator", demote),
        ("public", "member", make_read_only),
    ],
    ids=["ban", "ban-outsider", "kick", "mute", "demote", "read-only"],
)
def test_a_message_racing_a_sanction_lands_before_it_or_not_at_all(
    monkeypatch, visibility, role, sanction
):
    """The store checks the sender's membership inside its transaction, so that a sanction
    committed a moment ago stops the message. The sanction here commits after the store has
    read the membership and before it writes: the message must then not be stored after it
    (the sanction waits for the message, or the message sees the sanction)."""
    owner, bob = make_user("owner"), make_user("bob")
    room = make_room("lobby", owner=owner, visibility=visibility)
    if role is not None:
        make_member(room, bob, role=role)
    read, sanctioned = threading.Event(), threading.Event()
    select_pairs = sql.select_pairs

    def held_after_the_membership_read(model, *args, **kwargs):
        found = select_pairs(model, *args, **kwargs)
        if model is Membership and threading.current_thread().name == "sender":
            read.set()
            sanctioned.wait(HOLD)  # a sanction that need not wait for us commits meanwhile
        return found

    monkeypatch.setattr(sql, "select_pairs", held_after_the_membership_read)

    def send():
        return services.message_send(room=room, author=bob, body="hi", client_id="c1")

    sending = in_thread("sender", send)
    assert read.wait(WAIT)

    def moderate():
        sanction(Room.objects.get(pk=room.pk), owner, bob)
        sanctioned.set()

    moderating = in_thread("moderator", moderate)
    result, _ = sending(), moderating()

    event = SecurityEvent.objects.get(event=moderation_event(sanction))
    sent = MessageLog.objects.filter(event=MessageLog.Event.SENT).first()
    if result.error is None:
        assert sent is not None
        assert Message.objects.filter(room=room, seq=result.seq).exists()
        assert sent.chain_seq < event.chain_seq, "a message was stored after the sanction"
    else:
        assert sent is None
        assert not Message.objects.filter(room=room).exists()


def hold_after_reading_membership(
    monkeypatch, user, *, until: threading.Event, thread: str = "actor"
) -> threading.Event:
    """Hold the thread named `thread` just after it reads `user`'s membership, until `until` is
    set (or HOLD has passed). The event returned is set once it is held."""
    read = threading.Event()
    membership = services._membership

    def held(room, member, **kwargs):
        found = membership(room, member, **kwargs)
        if member.pk == user.pk and threading.current_thread().name == thread:
            read.set()
            until.wait(HOLD)
        return found

    monkeypatch.setattr(services, "_membership", held)
    return read


def delete_message(room, actor, seq):
    services.message_delete(actor=actor, room=room, seq=seq)


def restore_message(room, actor, seq):
    services.message_restore(actor=actor, message=Message.objects.get(room=room, seq=seq))


@pytest.mark.parametrize(
    ("act", "author", "sanction", "refused"),
    [
        (delete_message, "owner", demote, services.Forbidden),
        (restore_message, "owner", demote, services.Forbidden),
        (delete_message, "bob", ban, services.Forbidden),
    ],
    ids=["delete-demoted", "restore-demoted", "delete-own-banned"],
)
def test_a_deletion_racing_a_sanction_of_its_actor_lands_before_it_or_not_at_all(
    monkeypatch, act, author, sanction, refused
):
    """bob (a moderator, or the author) deletes or restores a message while the owner demotes
    or bans him. The sanction commits after bob's permission was read: bob's act must not be
    stored after it."""
    owner, bob = make_user("owner"), make_user("bob")
    room = make_room("lobby", owner=owner)
    make_member(room, bob, role="moderator")
    writer = {"owner": owner, "bob": bob}[author]
    services.message_send(room=room, author=writer, body="hi", client_id="c1")
    if act is restore_message:
        services.message_delete(actor=owner, room=room, seq=1)
    sanctioned = threading.Event()
    read = hold_after_reading_membership(monkeypatch, bob, until=sanctioned)
    acting = in_thread("actor", act, room, bob, 1)
    assert read.wait(WAIT)

    def moderate():
        sanction(room, owner, bob)
        sanctioned.set()

    moderating = in_thread("moderator", moderate)
    try:
        acting()
    except refused:
        acted = False
    else:
        acted = True
    moderating()
    event = SecurityEvent.objects.get(event=moderation_event(sanction))
    kind = MessageLog.Event.RESTORED if act is restore_message else MessageLog.Event.DELETED
    done = MessageLog.objects.filter(event=kind, user=bob).first()
    if acted:
        assert done is not None
        assert done.chain_seq < event.chain_seq, "bob's act was stored after his sanction"
    else:
        assert done is None


def ban_carol(room, actor, seq):
    services.member_ban(actor=actor, room=room, user=type(actor).objects.get(username="carol"))


def test_a_moderator_s_ban_racing_their_demotion_lands_before_it_or_not_at_all(monkeypatch):
    """bob, a moderator, bans carol while the owner demotes him: his ban must not be stored
    after his demotion (his rights are read under the room's lock, which the demotion takes)."""
    owner, bob, carol = make_user("owner"), make_user("bob"), make_user("carol")
    room = make_room("lobby", owner=owner)
    make_member(room, bob, role="moderator")
    make_member(room, carol)
    demoted = threading.Event()
    read = hold_after_reading_membership(monkeypatch, bob, until=demoted)
    acting = in_thread("actor", ban_carol, room, bob, None)
    assert read.wait(WAIT)

    def moderate():
        demote(room, owner, bob)
        demoted.set()

    moderating = in_thread("moderator", moderate)
    try:
        acting()
    except services.Forbidden:
        banned = None
    else:
        banned = SecurityEvent.objects.get(event=SecurityEvent.Event.MEMBER_BANNED)
    moderating()
    demotion = SecurityEvent.objects.get(event=SecurityEvent.Event.ROLE_CHANGED)
    if banned is not None:
        assert banned.chain_seq < demotion.chain_seq, "bob's ban was stored after his demotion"
    else:
        assert Membership.objects.get(room=room, user=carol).banned_at is None


@pytest.mark.parametrize("joining", ["room_join", "membership_add"])
def test_a_ban_of_an_outsider_racing_their_joining_is_one_or_the_other(monkeypatch, joining):
    """eve joins a public room (or a moderator adds her) while the owner bans her: neither had
    a row to lock, and both insert one. Each must end cleanly, the ban kept either way."""
    owner, eve = make_user("owner"), make_user("eve")
    room = make_room("lobby", owner=owner)
    banned = threading.Event()
    read = hold_after_reading_membership(monkeypatch, eve, until=banned, thread="joiner")

    def join():
        if joining == "room_join":
            return services.room_join(user=eve, room=room)
        return services.membership_add(actor=owner, room=room, user=eve)

    joined = in_thread("joiner", join)
    assert read.wait(WAIT)

    def ban_eve():
        services.member_ban(actor=owner, room=room, user=eve)
        banned.set()

    banning = in_thread("moderator", ban_eve)
    with contextlib.suppress(services.Forbidden, services.Conflict):  # the ban came first
        joined()
    banning()
    assert Membership.objects.get(room=room, user=eve).banned_at is not None


async def test_a_message_sent_after_its_author_s_deactivation_committed_is_not_stored(
    people, monkeypatch
):
    """alice's account is deactivated (the admin, another process); her socket's close is on
    its way through the layer when her next message reaches the store. The store re-reads the
    membership so that a ban committed a moment ago stops the message "even if the sender's
    socket has not heard of it yet"; a deactivation committed a moment ago must stop it too,
    but the store judges the author by the user object the socket opened with."""
    alice, _, room = people
    a, _ = await join(alice, room)
    publish, released = broadcast._send, threading.Event()

    def revocation_on_its_way(group, event):
        if event["type"] == "hub.revoke":
            released.wait(WAIT)
        publish(group, event)

    monkeypatch.setattr(broadcast, "_send", revocation_on_its_way)
    # Its own thread: the deactivation's publication waits for the message below.
    deactivating = asyncio.ensure_future(
        database_sync_to_async(services.user_deactivate, thread_sensitive=False)(
            actor=None, user=await sync(type(alice).objects.get)(pk=alice.pk)
        )
    )
    await sync(eventually_sync)(
        lambda: not type(alice).objects.get(pk=alice.pk).is_active, "deactivated"
    )
    await send(a, type="message", body="still here", client_id="c1")
    answer = json.loads(await a.receive_from(WAIT))
    released.set()
    await deactivating
    stored = await sync(Message.objects.filter(room=room, client_id="c1").exists)()
    assert not stored, f"a deactivated user's message was stored: {answer}"
    await a.disconnect()


@pytest.mark.parametrize("change", ["unstaff", "deactivate", "delete"])
def test_a_message_from_an_author_changed_since_their_socket_opened_is_refused(change):
    """The socket's user object is the one it opened with; the store reads the account as it
    is now (a staff member who lost the flag could still post in a read-only room)."""
    owner = make_user("owner")
    room = make_room("quiet", visibility=Room.Visibility.READ_ONLY, owner=owner)
    helper = make_user("helper", is_staff=True)
    as_opened = type(helper).objects.get(pk=helper.pk)
    if change == "delete":
        as_opened.delete()
        as_opened.pk = helper.pk
    else:
        fields = {"is_staff": False} if change == "unstaff" else {"is_active": False}
        type(helper).objects.filter(pk=helper.pk).update(**fields)
    result = services.message_send(room=room, author=as_opened, body="hi", client_id="c1")
    assert result.error == "forbidden"
    assert not Message.objects.filter(room=room).exists()
