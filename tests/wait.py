"""Waiting on a condition in tests: up to WAIT, instead of a sleep standing in for it."""

import asyncio
import time
from collections.abc import Callable

from tests.conftest import WAIT


async def eventually(ready: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Let the event loop run until `ready()` holds; fail, saying `what` did not happen, after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.005)


def eventually_sync(ready: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """`eventually` for code on another thread than the event loop (a database thread)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.005)
