"""The HTTP throttles' store: DRF's limits, checked and recorded in one step (accounts.throttling).

Each test runs on both stores: this process's cache (no REDIS_URL: one process) and Redis (the
deployment's store, shared by every process). A thread stands in for a process: with Redis they
share nothing but the server, as processes do.
"""

import json
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
from tests.services import reachable_redis_url, redis_clear_prefix


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, settings):
    if request.param == "redis":
        # A prefix of the test's own: the run's is cleared only when the run uses Redis.
        url, prefix = reachable_redis_url(), f"test-throttles-{uuid.uuid4().hex}"
        settings.REDIS_URL, settings.CHAT_REDIS_PREFIX = url, prefix
        yield request.param
        redis_clear_prefix(url, prefix)
    else:
        settings.REDIS_URL = ""
        cache.clear()
        yield request.param


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


def test_concurrent_requests_are_allowed_exactly_the_limit(store, monkeypatch):
    """24 requests at the same moment, limit 5: 5 allowed. DRF's read-then-write let through
    every request that read the list before another wrote it (on Redis, up to 24 of 24).
    Without Redis, DRF's code runs under a lock: each read of the cache here takes a
    millisecond more, so that without the lock every request would read before any wrote."""
    from django.core.cache import caches

    if store == "memory":
        backend = type(caches["default"])
        read = backend.get

        def slow_read(self, *args, **kwargs):
            value = read(self, *args, **kwargs)
            time.sleep(0.001)
            return value

        monkeypatch.setattr(backend, "get", slow_read)
    Throttle = throttle_class(5, 60)
    start = threading.Barrier(24)
    allowed: list[bool] = []

    def request():
        throttle = Throttle()
        start.wait(timeout=WAIT)
        allowed.append(throttle.allow_request(None, None))

    threads = [threading.Thread(target=request) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
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
@pytest.mark.parametrize("request_kind", ["api login", "form login", "ticket", "api", "logout"])
def test_throttles_fail_closed_when_redis_cannot_be_reached(settings, request_kind):
    """No counter, no sign-in and no ticket: 503 (never unthrottled, never a 500). The limit on
    every other API request guards capacity only, and lets them through: logging out, which
    ends a stolen login, must work during an outage."""
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
    elif request_kind == "ticket":
        response = api.post("/api/tickets/", {"room": "lobby"}, format="json")
        assert response.status_code == 503
        assert response.json()["code"] == "unavailable"
    elif request_kind == "api":
        assert api.get("/api/rooms/lobby/messages/").status_code == 200
    else:
        refresh = APIClient().post(
            "/api/auth/token/", {"username": "alice", "password": PASSWORD}, format="json"
        )
        assert refresh.status_code == 503  # sign-in is limited, so it waits for Redis
        response = APIClient().post("/api/auth/logout/", {"refresh": "not-a-token"}, format="json")
        assert (response.status_code, response.json()["code"]) == (401, "token_not_valid")


def test_a_limit_of_zero_refuses_for_a_whole_window(store):
    """As DRF: no request, and Retry-After the window (the script found no oldest entry)."""
    throttle = throttle_class(0, 60)()
    assert not throttle.allow_request(None, None)
    assert throttle.wait() == 60


@pytest.mark.django_db
@pytest.mark.parametrize("way", ["api", "page"])
def test_a_login_refused_for_its_address_does_not_spend_the_usernames_budget(
    store, monkeypatch, way
):
    """DRF asks every throttle and each records the request: an attacker refused for their IP
    still used up alice's per-username budget, and alice, from her own address, was refused."""
    from django.test import Client
    from rest_framework.test import APIClient

    from accounts import throttling

    make_user("alice")
    for cls, scope, rate in [
        (throttling.LoginIPThrottle, "login_ip", "1/min"),
        (throttling.LoginUsernameThrottle, "login_user", "2/min"),
    ]:
        monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, scope: rate})

    def attempt(password, ip):
        form = {"username": "alice", "password": password}
        if way == "api":
            return APIClient().post("/api/auth/token/", form, format="json", REMOTE_ADDR=ip)
        return Client().post("/login/", form, REMOTE_ADDR=ip)

    attacker = [attempt("wrong-1", "203.0.113.5").status_code for _ in range(4)]
    assert attacker == ([401] if way == "api" else [200]) + [429] * 3
    assert attempt(PASSWORD, "198.51.100.7").status_code == (200 if way == "api" else 302)


@pytest.mark.parametrize(
    ("sent", "key"),
    [
        (" Alice\t", "alice"),
        ("\uff41lice", "alice"),  # a fullwidth "a": NFKC
        (123, "123"),
        ("   ", None),
        (True, None),
        (["alice"], None),
        # Longer than any username: not normalised (NFKC makes U+FDFA 18 characters, and a
        # long run of them cost the server a second per request), only stripped and folded.
        (" " + "\ufdfa" * 151, "\ufdfa" * 151),
    ],
)
def test_login_username_is_the_name_signing_in_reads(sent, key):
    from accounts.throttling import login_username

    assert login_username(sent) == key


@pytest.mark.django_db
@pytest.mark.parametrize("way", ["api", "page"])
@pytest.mark.parametrize(("limit", "scope"), [("account", "login_user"), ("address", "login_ip")])
def test_login_refusals_are_audited_once_a_window(
    store, settings, monkeypatch, caplog, way, limit, scope
):
    """A brute force shows in the audit trail once the limit stops it: the first refusal of
    each window writes a LOGIN_THROTTLED row (and a security log line), the refusals after it
    in that window write nothing, so hammering cannot fill the table."""
    from django.test import Client
    from rest_framework.test import APIClient

    from accounts import throttling
    from chat.models import SecurityEvent

    # A hash of milliseconds: with Django's own (half a second here) two guesses could span
    # the whole one-second window of the second round.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    make_user("alice")
    cls = throttling.LoginUsernameThrottle if limit == "account" else throttling.LoginIPThrottle
    monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, scope: "2/s"})

    def attempt(i: int):
        # Against one account from many addresses, or from one address at many accounts.
        username = "alice" if limit == "account" else f"user{i}"
        ip = f"198.51.100.{i}" if limit == "account" else "203.0.113.5"
        form = {"username": username, "password": "wrong-1"}
        if way == "api":
            return APIClient().post("/api/auth/token/", form, format="json", REMOTE_ADDR=ip)
        return Client().post("/login/", form, REMOTE_ADDR=ip)

    def throttled_rows():
        return list(SecurityEvent.objects.filter(event=SecurityEvent.Event.LOGIN_THROTTLED))

    statuses = [attempt(i).status_code for i in range(6)]
    assert statuses == [401 if way == "api" else 200] * 2 + [429] * 4
    (row,) = throttled_rows()
    assert row.ip == ("198.51.100.2" if limit == "account" else "203.0.113.5")
    expected = {
        "limit": limit,
        "rate": "2/s",
        "path": "/api/auth/token/" if way == "api" else "/login/",
    }
    if limit == "account":
        expected["username"] = "alice"
    assert row.details == expected
    assert row.reason == f"sign-in attempts per {limit} over 2/s"
    warnings = [r for r in caplog.records if r.name == "chat.security"]
    assert len(warnings) == 1
    assert "sign-ins throttled" in warnings[0].getMessage()
    # A second later the window has moved on: two more attempts pass, then a new first refusal.
    time.sleep(1.1)
    statuses = [attempt(i).status_code for i in range(10, 13)]
    assert statuses[-1] == 429, statuses
    assert len(throttled_rows()) == 2


@pytest.mark.django_db
@pytest.mark.parametrize("sent", ["al\x00ice", "\ud800alice", "a" * 300])
def test_a_refused_username_is_audited_as_text_any_database_stores(
    store, monkeypatch, caplog, sent
):
    """The name is as the client sent it, not validated yet: a NUL or a lone surrogate would
    make PostgreSQL's jsonb refuse the row, and the refusal a 500."""
    from rest_framework.test import APIClient

    from accounts import throttling
    from chat.models import SecurityEvent

    cls = throttling.LoginUsernameThrottle
    monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, "login_user": "1/min"})
    # As raw JSON: the test client's renderer cannot encode a lone surrogate, a client can.
    body = json.dumps({"username": sent, "password": "wrong-1"})

    def attempt():
        return APIClient().post("/api/auth/token/", body, content_type="application/json")

    first = attempt()
    assert first.status_code in (400, 401)  # the serializer refuses a NUL
    refused = attempt()
    assert refused.status_code == 429
    row = SecurityEvent.objects.get(event=SecurityEvent.Event.LOGIN_THROTTLED)
    stored = row.details["username"]
    assert len(stored) <= 150
    assert "\x00" not in stored
    stored.encode("utf-8")  # no lone surrogate left
    # The security log's line is as short (a name of any length was logged whole).
    (line,) = [r.getMessage() for r in caplog.records if r.name == "chat.security"]
    assert len(line) < 300


@pytest.mark.django_db
@pytest.mark.parametrize("credential", ["garbage", "expired", "ended login", "deleted user"])
def test_refused_credentials_take_their_place_in_the_addresss_budget(
    store, monkeypatch, credential
):
    """DRF authenticates before it throttles, and a refused token ends the request with 401:
    a client with a revoked or expired token was never limited (and an ended login's token
    costs a statement each time). Now each refusal counts as an anonymous request from its
    address; over the budget, 429 with Retry-After. Other addresses and signed-in users keep
    their own budgets."""
    from datetime import timedelta

    from rest_framework.test import APIClient
    from rest_framework_simplejwt.tokens import AccessToken

    from accounts import throttling

    cls = throttling.ApiThrottle
    monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, "api": "3/min"})
    alice, mallory = make_user("alice"), make_user("mallory")
    make_room("lobby")
    if credential == "garbage":
        token = "not.a.token"
    elif credential == "expired":
        expired = AccessToken.for_user(mallory)
        expired.set_exp(lifetime=-timedelta(seconds=1))
        token = str(expired)
    else:
        api = APIClient()
        tokens = api.post(
            "/api/auth/token/", {"username": "mallory", "password": PASSWORD}, format="json"
        ).json()
        token = tokens["access"]
        if credential == "ended login":
            api.post("/api/auth/logout/", {"refresh": tokens["refresh"]}, format="json")
        else:
            mallory.delete()

    def get(address, bearer=token):
        client = APIClient()
        if bearer:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {bearer}")
        return client.get("/api/rooms/", REMOTE_ADDR=address)

    refused = [get("203.0.113.5") for _ in range(4)]
    assert [r.status_code for r in refused] == [401, 401, 401, 429]
    assert refused[-1].json()["code"] == "throttled"
    assert int(refused[-1]["Retry-After"]) > 0
    # The address's anonymous budget is the one spent (logging out asks for no token).
    logout = APIClient().post(
        "/api/auth/logout/", {"refresh": "x"}, format="json", REMOTE_ADDR="203.0.113.5"
    )
    assert logout.status_code == 429
    assert get("198.51.100.7").status_code == 401
    # Alice, signed in, from the same address, has a budget of her own.
    alice_api = bearer_client(alice)
    assert alice_api.get("/api/rooms/", REMOTE_ADDR="203.0.113.5").status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("way", ["api", "page", "anonymous api"])
@pytest.mark.parametrize(
    ("addresses", "refused"),
    [
        # One client, a new address of its IPv6 /64 for every request: still one client.
        (["2001:db8::1", "2001:db8::2", "2001:db8::a:3"], True),
        (["198.51.100.1", "198.51.100.2", "198.51.100.3"], False),
        (["2001:db8:0:1::1", "2001:db8:0:2::1", "2001:db8:0:3::1"], False),
    ],
    ids=["ipv6-one-network", "ipv4-addresses", "ipv6-networks"],
)
def test_address_limits_count_an_ipv6_network_once(store, monkeypatch, way, addresses, refused):
    """A subscriber is given an IPv6 /64 (or more) and may use any of its 2**64 addresses: a
    limit per address was a limit on nobody. Sign-in per address and the anonymous API budget
    count the /64."""
    from django.test import Client
    from rest_framework.test import APIClient

    from accounts import throttling

    make_user("alice")
    for cls, scope in [(throttling.LoginIPThrottle, "login_ip"), (throttling.ApiThrottle, "api")]:
        monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, scope: "2/min"})

    def attempt(n, ip):
        if way == "anonymous api":
            return APIClient().post(
                "/api/auth/logout/", {"refresh": "x"}, format="json", REMOTE_ADDR=ip
            )
        # A different account each time: the per-username limit is not the one tested.
        form = {"username": f"user{n}", "password": "wrong"}
        if way == "api":
            return APIClient().post("/api/auth/token/", form, format="json", REMOTE_ADDR=ip)
        return Client().post("/login/", form, REMOTE_ADDR=ip)

    codes = [attempt(n, ip).status_code for n, ip in enumerate(addresses)]
    assert codes[:2] == [attempt(9, "192.0.2.1").status_code] * 2
    assert (codes[2] == 429) is refused


@pytest.mark.django_db
def test_a_refusal_that_cannot_be_audited_still_refuses(store, monkeypatch, caplog):
    """The audit row of a refusal failing (the database, say) leaves the refusal a 429, not a
    500; the security log still says it, once, and a database that keeps failing is not asked
    again within the window."""
    from django.db import OperationalError
    from rest_framework.test import APIClient

    from accounts import throttling
    from chat.models import SecurityEvent

    cls = throttling.LoginUsernameThrottle
    monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, "login_user": "1/min"})
    write = throttling.audit.security_event
    attempts = []

    def failing(**fields):
        if fields["event"] == SecurityEvent.Event.LOGIN_THROTTLED:
            attempts.append(fields)
            raise OperationalError("database is locked")
        return write(**fields)

    monkeypatch.setattr(throttling.audit, "security_event", failing)
    form = {"username": "alice", "password": "wrong-1"}
    codes = [
        APIClient().post("/api/auth/token/", form, format="json").status_code for _ in range(4)
    ]
    assert codes == [401, 429, 429, 429]
    assert len(attempts) == 1
    assert "sign-in refusal not audited: OperationalError" in caplog.text
    warnings = [r for r in caplog.records if r.name == "chat.security"]
    assert len(warnings) == 1
