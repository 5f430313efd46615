"""The embedded default's channel layer: Channels' in-memory layer without a sweep per message."""

from __future__ import annotations

import time

from channels.layers import InMemoryChannelLayer as StockInMemoryChannelLayer


class InMemoryChannelLayer(StockInMemoryChannelLayer):
    """Channels' in-memory layer whose expiry sweep runs at most once per `clean_interval`.

    The stock layer calls `_clean_expired` on every `receive` and every `group_send`, and that
    walks every queued message and every membership of every group: O(rooms + sockets) of work
    per published message. Under many small rooms it was 15% of the server's busy time (py-spy,
    `python -m bench --scenario persist --targets chat --profile`). Messages expire after
    `expiry` (30 s here) and memberships after `group_expiry` (a day), so sweeping once a second
    changes when a stale entry goes by at most that second; what is delivered does not change.
    """

    clean_interval = 1.0

    def __init__(self, *args, clean_interval: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if clean_interval is not None:
            self.clean_interval = clean_interval
        self._next_clean = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now < self._next_clean:
            return
        self._next_clean = now + self.clean_interval
        super()._clean_expired()
