"""The reads of chat/selectors.py that no view or socket test covers on its own."""

import functools
from datetime import timedelta

import pytest
from django.utils import timezone

from chat import selectors, services
from chat.models import AuditChainHead, SecurityEvent
from tests.factories import make_member, make_room, make_user

pytestmark = pytest.mark.django_db


def _mute(owner, user, room) -> None:
    until = timezone.now() + timedelta(minutes=10)
    services.member_mute(actor=owner, room=room, user=user, until=until)


def _change_password(user) -> None:
    user.set_password("a-new-password-that-is-long")
    user.save()


def test_the_changes_of_a_process_s_rooms_and_users_are_read_in_one_statement(
    django_assert_num_queries,
):
    """From a chain position: what concerns the given rooms and users, in chain order, and the
    position the answer is complete up to (so a quiet stretch moves it on too)."""
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    room, elsewhere = make_room("lobby", owner=alice), make_room("elsewhere", owner=alice)
    for where in (room, elsewhere):
        make_member(where, bob)
    start = AuditChainHead.objects.values_list("last_seq", flat=True).first() or 0
    _mute(alice, bob, elsewhere)  # not a room of ours
    _change_password(carol)  # not a user of ours
    _mute(alice, bob, room)
    _change_password(bob)
    services.room_create(actor=alice, slug="new", title="New")  # closes no socket
    newest = SecurityEvent.objects.order_by("chain_seq").last().chain_seq
    read = functools.partial(
        selectors.socket_changes_after,
        room_ids=[room.pk],
        user_ids=[bob.pk],
        room_events=[SecurityEvent.Event.MEMBER_MUTED, SecurityEvent.Event.ROOM_ARCHIVED],
        user_events=[SecurityEvent.Event.PASSWORD_CHANGED],
    )
    with django_assert_num_queries(1):
        changes, last = read(after=start, limit=1)
    assert [(c.event, c.room_id) for c in changes] == [("member_muted", room.pk)]
    assert last == changes[0].seq
    changes, last = read(after=last, limit=10)
    assert [(c.event, c.user_id) for c in changes] == [("password_changed", bob.pk)]
    assert last == newest
    assert read(after=newest, limit=10) == ([], newest)
