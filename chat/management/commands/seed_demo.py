"""Demo users, rooms and memberships for trying the app locally (refused in production)."""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from chat.models import Membership, Room

DEMO_PASSWORD = "demo-chat-2026"  # noqa: S105  (demo data, refused when DEBUG is off)

USERS = [
    # username, staff, superuser
    ("alice", False, False),
    ("bob", False, False),
    ("carol", False, False),
    ("admin", True, True),
]
ROOMS = [
    # slug, title, visibility, {username: role}
    (
        "lobby",
        "Lobby",
        Room.Visibility.PUBLIC,
        {"alice": "owner", "bob": "moderator", "carol": "member"},
    ),
    ("team", "Team (private)", Room.Visibility.PRIVATE, {"alice": "owner", "bob": "member"}),
    ("announcements", "Announcements", Room.Visibility.READ_ONLY, {"alice": "owner"}),
]


class Command(BaseCommand):
    help = "Create demo users (password printed), rooms and memberships. Idempotent."

    def add_arguments(self, parser):
        parser.add_argument(
            "--force", action="store_true", help="seed even with DEBUG off (never in production)"
        )
        parser.add_argument(
            "--password", default=DEMO_PASSWORD, help="password for every demo user"
        )

    def handle(self, *args, **options):
        if not settings.DEBUG and not options["force"]:
            raise CommandError(
                "refusing to create demo users with DEBUG off (use --force on a test system)"
            )
        if len(options["password"]) < 8:
            raise CommandError("--password must be at least 8 characters")
        User = get_user_model()
        with transaction.atomic():
            users = {}
            for username, staff, superuser in USERS:
                user, created = User.objects.get_or_create(
                    username=username, defaults={"is_staff": staff, "is_superuser": superuser}
                )
                if created:
                    user.set_password(options["password"])
                    user.save(update_fields=["password"])
                users[username] = user
            for slug, title, visibility, members in ROOMS:
                room, _ = Room.objects.get_or_create(
                    slug=slug,
                    defaults={
                        "title": title,
                        "visibility": visibility,
                        "created_by": users["alice"],
                    },
                )
                for username, role in members.items():
                    Membership.objects.get_or_create(
                        room=room, user=users[username], defaults={"role": role}
                    )
        self.stdout.write("Demo logins (created once; existing passwords are left alone):")
        for username, staff, _ in USERS:
            note = "  staff, /admin/" if staff else ""
            self.stdout.write(f"  {username:<8} {options['password']}{note}")
        self.stdout.write("Rooms: " + ", ".join(f"/rooms/{slug}/" for slug, *_ in ROOMS))
