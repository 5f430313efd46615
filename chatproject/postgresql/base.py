"""Django's PostgreSQL backend, with CONN_HEALTH_CHECKS once per idle spell, not once per hop.

Django checks a persistent connection (`SELECT 1`) before its first query after every
`close_old_connections()`, and Channels' `database_sync_to_async` calls that around every call,
as every request does. On the socket paths that made one round trip in four a health check:
four a full handshake, one per batch of messages (docs/performance.md, "At scale").

Here a connection whose last unit of work ran queries less than `DATABASE_HEALTH_CHECK_IDLE`
seconds ago, and was left open, is taken to be alive: its queries ran, or they failed and
Django's own check at the end of that unit found it alive (a connection that fails the check is
closed). One idle for longer, or whose last unit of work ran no query, is checked as Django
checks it. What this gives up: a connection the server dropped within that last second fails
its next unit of work, once, with the error every caller already handles (HTTP 500, a socket's
"unavailable"), and is then replaced.
"""

import time

from django.conf import settings
from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    _used = False  # a cursor was made since the last close_if_unusable_or_obsolete()
    _proven_at = float("-inf")  # when a unit of work that ran queries last left it open

    def _cursor(self, name=None):
        self._used = True
        return super()._cursor(name)

    def close_if_unusable_or_obsolete(self):
        used, self._used = self._used, False
        super().close_if_unusable_or_obsolete()
        if used and self.connection is not None:
            self._proven_at = time.monotonic()

    def close_if_health_check_failed(self):
        if (
            self.connection is not None
            and not self.health_check_done
            and time.monotonic() - self._proven_at < settings.DATABASE_HEALTH_CHECK_IDLE
        ):
            self.health_check_done = True
            return
        super().close_if_health_check_failed()
