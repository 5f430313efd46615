"""Django's PostgreSQL backend, with CONN_HEALTH_CHECKS once per idle spell, not once per hop.

Django checks a persistent connection (`SELECT 1`) before its first query after every
`close_old_connections()`, which the database thread runs before every call
(chatproject/dbthread.py; Channels' `database_sync_to_async` ran it before and after), as every
request does. On PostgreSQL that was four of a full handshake's eighteen statements,
and one per batch of messages (docs/performance.md, "At scale").

Here a connection is taken to be alive if its last unit of work made a cursor less than
`DATABASE_HEALTH_CHECK_IDLE` seconds ago and left it open: its queries ran, or they failed and
Django's own check at the end of that unit found it alive (a connection that fails the check is
closed; the database thread makes that check at the start of its next call). One idle for
longer, or whose last unit of work ran no query, is checked as Django checks it. What this
gives up: a connection the server dropped within that last second fails its next unit of work,
once, with the error every caller already handles (HTTP 500, a socket's
"unavailable"), and is then replaced.
"""

import time

from django.conf import settings
from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    _used_at: float | None = None  # its last cursor since close_if_unusable_or_obsolete()
    _proven_at = float("-inf")  # that time, for a unit of work that then left it open

    def _cursor(self, name=None):
        self._used_at = time.monotonic()
        return super()._cursor(name)

    def close_if_unusable_or_obsolete(self):
        used_at, self._used_at = self._used_at, None
        super().close_if_unusable_or_obsolete()
        if used_at is not None and self.connection is not None and not self.closed_in_transaction:
            self._proven_at = used_at

    def close_if_health_check_failed(self):
        if (
            self.connection is not None
            and not self.health_check_done
            and time.monotonic() - self._proven_at
            < getattr(settings, "DATABASE_HEALTH_CHECK_IDLE", 1.0)
        ):
            self.health_check_done = True
            return
        super().close_if_health_check_failed()
