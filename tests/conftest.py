"""Shared fixtures: settings for tests, a clean per-test runtime and shared state."""

import os

import pytest
from channels.layers import channel_layers, get_channel_layer
from django.conf import settings as django_settings
from django.core.cache import cache
from django.db import connection

from chat.runtime import shutdown_runtime
from tests.services import redis_clear_prefix

ORIGIN = "http://testserver"

# How long the socket helpers (tests/ws.py, tests/e2e/client.py) wait for a frame, a close or a
# connect: an upper bound that a passing test never waits in full, long enough for a loaded
# two-core CI host (a connect alone is a rate check, a ticket redeem, presence and the hub:
# several round trips to the database and Redis). channels' own 1 s defaults made a slow moment
# fail a test. How fast things happen is the bench's to measure, not a test's.
WAIT = 10.0


def pytest_configure(config):
    # In CI a missing service is a failure, never a silent skip (see .ci/run).
    if os.environ.get("CI") and os.environ.get("REDIS_URL"):
        import redis

        redis.Redis.from_url(os.environ["REDIS_URL"]).ping()


@pytest.fixture(scope="session", autouse=True)
def _release_test_database(django_db_setup, django_db_blocker):
    """Let Django drop the PostgreSQL test database at the end of the run.

    Async tests reach the database from the database thread and asgiref's, whose persistent
    connections (CONN_MAX_AGE) outlive the tests; PostgreSQL refuses to drop a database with
    sessions on it, and the run would leave a test_* database behind every time. Torn down
    before django_db_setup, this ends those sessions first.
    """
    yield
    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(autouse=True)
def _test_settings(settings):
    settings.CHAT_ALLOWED_ORIGINS = [ORIGIN]
    settings.CHAT_TRUSTED_PROXIES = []
    settings.ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
    settings.SECURE_SSL_REDIRECT = False
    settings.CHAT_AUDIT_FLUSH_INTERVAL = 0.01
    # On by default in production; tests/accounts/test_admin_otp.py turns it on where it matters.
    settings.CHAT_ADMIN_REQUIRE_OTP = False


@pytest.fixture(autouse=True)
def _clean_shared_state():
    """Rate limits, throttles and presence must not leak from one test into the next."""
    if django_settings.REDIS_URL:
        redis_clear_prefix()
    else:
        cache.clear()
    yield
    redis_clear_prefix()


@pytest.fixture(autouse=True)
async def _clean_runtime():
    """Every test gets its own hub, writer and audit buffer, and an empty channel layer."""
    yield
    await shutdown_runtime()
    await get_channel_layer().flush()
    # A fresh layer for the next test: channels_redis keeps asyncio locks per layer, bound to
    # the loop that made them, and each test has its own loop ("bound to a different event
    # loop" when one was left held by a cancelled receive).
    channel_layers.backends.clear()
