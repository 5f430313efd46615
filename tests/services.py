"""Helpers around the external services a test run may use (Redis), kept out of fixtures' way."""

import os

import pytest
from django.conf import settings


def service_unavailable(reason: str):
    """A missing service skips the test locally; in CI it fails it (.ci/run)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. CI must run this test.", pytrace=False)
    pytest.skip(reason)


def reachable_redis_url() -> str:
    """The Redis the tests may use (the run's own, else CHAT_TEST_REDIS_URL), checked."""
    import redis

    url = settings.REDIS_URL or os.environ.get("CHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        service_unavailable(f"Redis at {url} is not reachable: {error}")
    return url


def redis_clear_prefix(url: str | None = None, prefix: str | None = None) -> None:
    """Delete every key of a prefix (by default this run's: cache, channel layer, limits,
    presence)."""
    url = url or settings.REDIS_URL
    if not url:
        return
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix or settings.CHAT_REDIS_PREFIX}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()
