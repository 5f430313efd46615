"""Helpers around the external services a test run may use (Redis), kept out of fixtures' way."""

from django.conf import settings


def redis_clear_prefix() -> None:
    """Delete every key of this run's prefix (cache, channel layer, limits, presence)."""
    if not settings.REDIS_URL:
        return
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{settings.CHAT_REDIS_PREFIX}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()
