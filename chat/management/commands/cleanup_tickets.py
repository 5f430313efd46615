"""Delete spent WebSocket tickets (used, revoked, expired) in short batches, safe under traffic."""

import re
from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from accounts.models import EndedLogin, Ticket
from accounts.services import JOINING_GRACE

DURATION_RE = re.compile(r"(\d+)([smhd])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_BATCH_SIZE = 10_000  # stays under every database's limit on query parameters


def parse_duration(value: str) -> timedelta:
    match = DURATION_RE.fullmatch(value.strip())
    if match is None:
        raise CommandError(
            f"--older-than {value!r} is not a duration: use a whole number and a unit, "
            "e.g. 3600s, 30m, 12h or 2d"
        )
    try:
        return timedelta(seconds=int(match[1]) * UNIT_SECONDS[match[2]])
    except OverflowError:
        raise CommandError(f"--older-than {value!r} is too long") from None


class Command(BaseCommand):
    help = (
        "Delete tickets that can never be redeemed again (used, revoked or expired) and were "
        "issued longer ago than --older-than. Unused, unexpired tickets are never touched."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--older-than",
            default="1d",
            help="only tickets issued longer ago than this: 3600s, 30m, 12h, 2d (default 1d)",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=1000,
            help=f"rows deleted per transaction (1-{MAX_BATCH_SIZE}, default 1000)",
        )
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")

    def handle(self, *args, older_than: str, batch_size: int, dry_run: bool, **options):
        age = parse_duration(older_than)
        # A ticket used moments ago is still needed: revoking its login revokes it too, so a
        # socket that was still joining finds out as it joins (accounts.services.JOINING_GRACE).
        # One issued longer ago than its lifetime and that grace was used before the grace.
        shortest = settings.CHAT_TICKET_LIFETIME + JOINING_GRACE
        if age < shortest:
            raise CommandError(
                f"--older-than {older_than!r} is too short: at least "
                f"{int(shortest.total_seconds())}s (a ticket's lifetime and the joining grace)"
            )
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise CommandError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}")
        now = timezone.now()
        try:
            cutoff = now - age
        except OverflowError:
            raise CommandError(f"--older-than {older_than!r} is too long") from None
        # Fixed at the start: a ticket spent by then stays spent (used_at and revoked_at are set
        # once, expiry only comes closer), so every batch re-checks the same condition.
        spent = Ticket.objects.spent(now).filter(issued_at__lt=cutoff)
        states = Ticket.objects.state_conditions(now)
        counts = spent.aggregate(
            total=Count("pk"),
            revoked=Count("pk", filter=states["revoked"]),
            used=Count("pk", filter=states["used"]),
        )
        breakdown = (
            f"used {counts['used']}, revoked {counts['revoked']}, "
            f"expired unused {counts['total'] - counts['used'] - counts['revoked']}"
        )
        when = f"issued before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
        # Ended logins are kept while an access token of theirs could still be presented.
        ended = EndedLogin.objects.filter(expires_at__lte=now)
        if dry_run:
            self.stdout.write(f"Would delete {counts['total']} tickets {when} ({breakdown}).")
            self.stdout.write(f"Would delete {ended.count()} ended logins past their last token.")
            return
        deleted = batches = 0
        last_pk = 0
        while True:
            # Keyset pagination: each batch is one short transaction, so redemptions and new
            # tickets never wait long behind this command.
            pks = list(
                spent.filter(pk__gt=last_pk)
                .order_by("pk")
                .values_list("pk", flat=True)[:batch_size]
            )
            if not pks:
                break
            last_pk = pks[-1]
            with transaction.atomic():
                deleted += spent.filter(pk__in=pks).delete()[0]
            batches += 1
        self.stdout.write(
            f"Deleted {deleted} tickets {when} ({breakdown}) in {batches} batches "
            f"of at most {batch_size}."
        )
        self.stdout.write(f"Deleted {ended.delete()[0]} ended logins past their last token.")
