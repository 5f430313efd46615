"""Fixtures shared by the socket tests of this package."""

import pytest

from tests.factories import make_member, make_room, make_user


@pytest.fixture
def people():
    """alice owns the public lobby, bob is a member."""
    alice, bob = make_user("alice"), make_user("bob")
    room = make_room("lobby", owner=alice)
    make_member(room, bob)
    return alice, bob, room
