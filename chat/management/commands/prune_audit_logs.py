"""Retention: delete audit rows older than --days, leaving a signed checkpoint to resume at."""

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from chat import audit


class Command(BaseCommand):
    help = (
        "Delete the audit rows older than --days that form a prefix of the chain, record a signed "
        "checkpoint and an audit_pruned event, and keep the rest verifiable. Refuses to prune a "
        "chain that does not verify."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--days", type=int, required=True, help="keep this many days of audit rows (>= 1)"
        )
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
        parser.add_argument(
            "--batch-size",
            type=int,
            default=audit.PRUNE_BATCH,
            help=(
                "chain positions per transaction, each with its checkpoint: writers wait for one "
                f"batch's deletes at most (default {audit.PRUNE_BATCH})"
            ),
        )

    def handle(self, *args, days: int, dry_run: bool, batch_size: int, **options):
        if days < 1:
            raise CommandError("--days must be at least 1")
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        try:
            cutoff = timezone.now() - timedelta(days=days)
        except OverflowError:
            raise CommandError(f"--days {days} reaches before year 1") from None
        try:
            result = audit.prune_before(cutoff=cutoff, dry_run=dry_run, batch=batch_size)
        except audit.AuditChainBroken as exc:
            done = "nothing pruned"
            if exc.pruned_upto is not None:
                done = f"stopped, pruned up to chain position {exc.pruned_upto} (its checkpoint)"
            raise CommandError(
                f"{done}: {exc}. Investigate (verify_audit_log) before pruning."
            ) from exc
        when = f"older than {cutoff:%Y-%m-%d %H:%M:%S} UTC"
        if result.seq is None:
            self.stdout.write(f"Nothing to prune: no prefix of the audit chain is {when}.")
            return
        rows = ", ".join(f"{name} {count}" for name, count in (result.rows or {}).items())
        verb = "Would prune" if dry_run else "Pruned"
        self.stdout.write(
            f"{verb} {result.rows_pruned} audit rows ({rows}) {when}, "
            f"up to chain position {result.seq}."
        )
        if result.checkpoint is not None:
            steps = f" (the last of {result.steps})" if result.steps > 1 else ""
            self.stdout.write(
                f"Checkpoint at position {result.checkpoint.seq}{steps}, "
                f"link hash {result.checkpoint.row_hash}."
            )
