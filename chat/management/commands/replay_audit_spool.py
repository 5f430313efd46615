"""Append the audit rows spooled at a shutdown the database was down for (chat/spool.py)."""

from django.core.management.base import BaseCommand, CommandError

from chat import spool


class Command(BaseCommand):
    help = (
        "Append to the audit chain the rows a server kept on disk because the database was down "
        "when it shut down (manage.py serve does this when it starts). Files whose signature "
        "does not match are set aside as *.rejected and reported as a security event."
    )

    def handle(self, *args, **options):
        result = spool.replay()
        self.stdout.write(
            f"{result.files} spool file(s) replayed: {result.rows} audit rows appended, "
            f"{result.already_stored} already stored; {result.rejected_files} file(s) rejected"
        )
        if result.rejected_files:
            raise CommandError(f"rejected spool files are in {spool.spool_dir()}")
