"""Bench data, run as a subprocess with the server's environment (the load client never imports
the app): `python -m bench.seed make` reads a spec on stdin and prints rooms, members and access
tokens; `python -m bench.seed count PREFIX` prints how many messages the bench's rooms hold."""

import json
import os
import sys

PASSWORD = "bench-password-not-secret-0"  # noqa: S105  (a throwaway account on a temp database)


def make(spec: dict) -> dict:
    """Private rooms of `members` users each; one access token per user, minted as login would.

    Passwords are hashed once and shared, and tokens are minted here rather than through
    POST /api/auth/token/: a login costs a deliberate ~0.3 s of PBKDF2, which is not what
    any scenario measures.
    """
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.db import transaction

    from accounts.serializers import TokenObtainPairSerializer
    from chat.models import Membership, Room

    user_model = get_user_model()
    prefix, n_rooms, n_members = spec["prefix"], spec["rooms"], spec["members"]
    password = make_password(PASSWORD)
    with transaction.atomic():
        users = user_model.objects.bulk_create(
            user_model(username=f"{prefix}u{i}", password=password)
            for i in range(n_rooms * n_members)
        )
        rooms = Room.objects.bulk_create(
            Room(slug=f"{prefix}r{i}", title=f"Bench {i}", visibility=Room.Visibility.PRIVATE)
            for i in range(n_rooms)
        )
        Membership.objects.bulk_create(
            Membership(room=room, user=users[r * n_members + m], role=Membership.Role.MEMBER)
            for r, room in enumerate(rooms)
            for m in range(n_members)
        )
        tokens = [str(TokenObtainPairSerializer.get_token(user).access_token) for user in users]
    return {
        "rooms": [
            {
                "slug": room.slug,
                "members": [
                    {
                        "username": users[r * n_members + m].username,
                        "token": tokens[r * n_members + m],
                    }
                    for m in range(n_members)
                ],
            }
            for r, room in enumerate(rooms)
        ]
    }


def count(prefix: str) -> dict:
    from chat.models import Message

    return {"messages": Message.objects.filter(room__slug__startswith=prefix).count()}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    import django

    django.setup()
    command = sys.argv[1]
    result = make(json.load(sys.stdin)) if command == "make" else count(sys.argv[2])
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
