"""The HTTP throttles' store: DRF's limits, checked and recorded in one step (accounts.throttling).

Each test runs on both stores: this process's cache (no REDIS_URL: one process) and Redis (the
deployment's store, shared by every process). A thread stands in for a process: with Redis they
share nothing but the server, as processes do.
"""

import sys
import threading
import time
import uuid

import pytest
from django.core.cache import cache

from accounts.throttling import AtomicRateThrottle, FailClosed
from tests.accounts.test_tickets_api import bearer_client
from tests.conftest import WAIT
from tests.e2e.server import free_port
from tests.factories import PASSWORD, make_room, make_user
from tests.services import reachable_redis_url


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, settings):
    if request.param == "redis":
        settings.REDIS_URL = reachable_redis_url()
    else:
        settings.REDIS_URL = ""
        cache.clear()
    return request.param


def throttle_class(limit: int, seconds: float):
    """A throttle of `limit` requests per `seconds` on a key of its own."""
    key = f"throttle_test_{uuid.uuid4().hex}"

    class Throttle(FailClosed, AtomicRateThrottle):
        rate = "set"

        def parse_rate(self, rate):
            return limit, seconds

        def get_cache_key(self, request, view):
            return key

    return Throttle


def test_concurrent_requests_are_allowed_exactly_the_limit(store):
    """24 requests at the same moment, limit 5: 5 allowed. DRF's read-then-write let through
    every request that read the list before another wrote it."""
    Throttle = throttle_class(5, 60)
    start = threading.Barrier(24)
    allowed: list[bool] = []

    def request():
        throttle = Throttle()
        start.wait(timeout=WAIT)
        allowed.append(throttle.allow_request(None, None))

    threads = [threading.Thread(target=request) for _ in range(24)]
    # Threads switch every microsecond, not every 5 ms: in this process's cache, a check and
    # its record are then interleaved with other threads' unless something makes them one step.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    finally:
        sys.setswitchinterval(switch)
    assert (allowed.count(True), len(allowed)) == (5, 24)


def test_a_window_slides_and_refused_requests_do_not_count(store):
    """At most 3 in any second: a refusal says when the oldest request leaves the window, one
    request is allowed then, and the refusals before it took no place."""
    Throttle = throttle_class(3, 1.0)
    assert Throttle().allow_request(None, None)
    time.sleep(0.5)
    assert Throttle().allow_request(None, None)
    assert Throttle().allow_request(None, None)
    for _ in range(3):
        refused = Throttle()
        assert not refused.allow_request(None, None)
    assert 0.3 < refused.wait() <= 0.5
    time.sleep(refused.wait() + 0.05)
    # The first request left the window; the two half a second younger have not.
    assert Throttle().allow_request(None, None)
    again = Throttle()
    assert not again.allow_request(None, None)
    assert 0.2 < again.wait() <= 0.5


@pytest.mark.django_db
@pytest.mark.parametrize("request_kind", ["api login", "form login", "ticket"])
def test_throttles_fail_closed_when_redis_cannot_be_reached(settings, request_kind):
    """No counter, no request: 503 (never unthrottled, never a 500)."""
    from django.test import Client
    from rest_framework.test import APIClient

    alice = make_user("alice")
    make_room("lobby")
    api = bearer_client(alice)  # its login, before Redis goes
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    if request_kind == "api login":
        response = APIClient().post(
            "/api/auth/token/", {"username": "alice", "password": PASSWORD}, format="json"
        )
        assert response.status_code == 503
        assert response.json()["code"] == "unavailable"
    elif request_kind == "form login":
        response = Client().post("/login/", {"username": "alice", "password": PASSWORD})
        assert response.status_code == 503
        assert b"Sign-in is temporarily unavailable" in response.content
    else:
        response = api.post("/api/tickets/", {"room": "lobby"}, format="json")
        assert response.status_code == 503
        assert response.json()["code"] == "unavailable"
