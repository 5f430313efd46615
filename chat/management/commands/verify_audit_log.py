"""Walk the audit chain, print its head for anchoring, and fail on the first broken link."""

import hmac
import re

from django.core.management.base import BaseCommand, CommandError

from chat import audit

ANCHOR_RE = re.compile(r"(\d+):([0-9a-f]{64})")


class Command(BaseCommand):
    help = (
        "Verify every link of the audit chain from the newest checkpoint, print the head "
        "(position and hash) to record outside the database, and exit non-zero on tampering. "
        "--anchor checks a head recorded earlier is still part of the chain."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--anchor",
            metavar="SEQ:HASH",
            help="a head printed by an earlier run; fails if that link is gone or differs",
        )

    def handle(self, *args, anchor: str | None, **options):
        expected = None
        if anchor is not None:
            match = ANCHOR_RE.fullmatch(anchor.strip().lower())
            if match is None:
                raise CommandError("--anchor must be SEQ:HASH, as printed by verify_audit_log")
            expected = int(match[1]), match[2]
        result = audit.verify_chain()
        state = audit.chain_state()
        start = (
            f"checkpoint at {state.checkpoint.seq} ({state.checkpoint.rows_pruned} rows pruned "
            f"{state.checkpoint.created_at:%Y-%m-%d %H:%M:%S} UTC)"
            if state.checkpoint
            else "the start"
        )
        self.stdout.write(f"Links checked: {result.links_checked}, from {start}.")
        if not result.ok:
            raise CommandError(
                f"audit chain broken at position {result.first_bad_seq}: {result.problem}"
            )
        self.stdout.write(f"Head: {state.head_seq}:{state.head_hash}")
        self.stdout.write("Audit chain OK. Record the head above outside this database.")
        if expected is not None:
            self._check_anchor(*expected, state)

    def _check_anchor(self, seq: int, anchored_hash: str, state: audit.ChainState) -> None:
        if seq == 0:
            # The start, before the first link, which an empty chain prints as its head: every
            # chain starts there, pruned or not, and it holds nothing else to compare.
            if not hmac.compare_digest(anchored_hash, audit.GENESIS_HASH):
                raise CommandError("anchor 0 does not match: position 0 is the chain's start")
            self.stdout.write("Anchor 0 matches (the chain's start).")
            return
        checkpoint = state.checkpoint
        if checkpoint is not None and seq <= checkpoint.seq:
            if seq < checkpoint.seq:
                raise CommandError(
                    f"anchor {seq} was pruned (checkpoint at {checkpoint.seq}): "
                    "check against a more recent anchor"
                )
            stored = checkpoint.row_hash
        else:
            stored = audit.stored_link_hash(seq)
        if stored is None:
            # A verified chain without this link ends before it: its tail was cut and the head
            # rewound.
            raise CommandError(
                f"anchor {seq} is no longer in the chain (head at {state.head_seq}): "
                "links were removed from the end"
            )
        if not hmac.compare_digest(stored, anchored_hash):
            raise CommandError(
                f"anchor {seq} does not match: the chain was rewritten from there or before"
            )
        self.stdout.write(f"Anchor {seq} matches.")
