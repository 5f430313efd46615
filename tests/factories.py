"""Test data: users, rooms, memberships, tickets."""

import itertools
from functools import lru_cache

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password

from accounts import services as account_services
from chat.models import Membership, Room

PASSWORD = "correct-horse-battery-staple-42"
_counter = itertools.count(1)


@lru_cache(maxsize=8)
def _hashed(password: str) -> str:
    # The production hasher, once per password: hashing costs ~0.3 s on purpose, and tests make
    # many users. Logins (and e2e servers) still verify it the normal way.
    return make_password(password)


def make_user(username: str | None = None, *, password: str = PASSWORD, **fields):
    username = username or f"user{next(_counter)}"
    return get_user_model().objects.create(username=username, password=_hashed(password), **fields)


def make_room(
    slug: str | None = None, *, visibility: str = Room.Visibility.PUBLIC, owner=None, **fields
):
    slug = slug or f"room-{next(_counter)}"
    room = Room.objects.create(
        slug=slug,
        title=fields.pop("title", slug.title()),
        visibility=visibility,
        created_by=owner,
        **fields,
    )
    if owner is not None:
        Membership.objects.create(room=room, user=owner, role=Membership.Role.OWNER)
    return room


def make_member(room, user, role: str = Membership.Role.MEMBER, **fields) -> Membership:
    return Membership.objects.create(room=room, user=user, role=role, **fields)


def make_ticket(user, room, *, ip: str = "127.0.0.1", credential: str = "test") -> str:
    return account_services.ticket_issue(user=user, room=room, ip=ip, credential=credential).token
