"""Throttles keyed by what an attacker cannot choose: the resolved client IP, the account."""

import functools
import hashlib
import logging
import math
import os
import threading
import time
import unicodedata

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import DatabaseError
from django.http import HttpResponse
from django.template.loader import render_to_string
from redis.exceptions import RedisError
from rest_framework import status
from rest_framework.exceptions import APIException, Throttled
from rest_framework.throttling import SimpleRateThrottle, UserRateThrottle

from accounts.ip import client_ip_from_request, limit_key
from chat import audit

logger = logging.getLogger("accounts.throttling")


class ThrottleUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Temporarily unavailable; try again shortly."
    default_code = "unavailable"


class FailClosed:
    """Throttle counters live in Redis in production (AtomicRateThrottle). If it cannot be
    reached, refuse with 503 rather than a 500, and never let requests through unthrottled."""

    def allow_request(self, request, view):
        try:
            return super().allow_request(request, view)
        except (RedisError, OSError) as error:
            raise ThrottleUnavailable() from error


# A sliding log of the window's requests in a sorted set, checked and added to in one step.
# Redis's own clock, so the processes' clocks need not agree. Scores are microseconds (below
# 2**53, exact in Lua's doubles); members are unique even within one microsecond.
_WINDOW_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], now, ARGV[3])
    redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
    return -1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not oldest[2] then return window end  -- a limit of 0: DRF waits a whole window
return math.max(0, tonumber(oldest[2]) + window - now)
"""


@functools.lru_cache(maxsize=4)
def _window_script(url: str):
    """One client per process (and Redis URL) for the throttles, and their script."""
    import redis

    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=settings.REDIS_MAX_CONNECTIONS, timeout=5
    )
    return redis.Redis(connection_pool=pool).register_script(_WINDOW_SCRIPT)


# Without Redis the counters are in this process's cache: one lock makes each check-and-record
# a single step, as the script does in Redis.
_MEMORY_LOCK = threading.Lock()


class AtomicRateThrottle(SimpleRateThrottle):
    """DRF's limit, unchanged: at most N requests in any `duration` seconds, a refused request
    not counted, Retry-After when the oldest one leaves the window. What changes is the store.

    DRF reads a list of request times from the cache, then writes it back: two processes that
    serve the same key at the same moment both read N-1, both allow, and the later write drops
    the other's entry, so an attacker who spreads guesses over the processes gets more of them.
    With REDIS_URL set, one script checks and records a request atomically, on Redis's clock,
    in one round trip (DRF took two). Without it, the deployment is one process and its cache
    is local: DRF's own code runs under a lock.
    """

    def allow_request(self, request, view):
        if not settings.REDIS_URL:
            with _MEMORY_LOCK:
                return super().allow_request(request, view)
        if self.rate is None:
            return True
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        wait_us = _window_script(settings.REDIS_URL)(
            keys=[f"{settings.CHAT_REDIS_PREFIX}:{self.key}"],
            args=[self.num_requests, int(self.duration * 1_000_000), os.urandom(12).hex()],
        )
        self._wait = None if wait_us < 0 else wait_us / 1_000_000
        return self._wait is None

    def wait(self):
        if settings.REDIS_URL:
            return self._wait
        return super().wait()

    def first_refusal_in_window(self) -> bool:
        """Is the refusal just made the first of `self.key` for a window? Marked in the
        counters' own store, so that of several processes refusing at once, one says yes."""
        marker = f"{self.key}:refused"
        if not settings.REDIS_URL:
            return cache.add(marker, True, timeout=self.duration)  # atomic in its own lock
        client = _window_script(settings.REDIS_URL).registered_client
        window_ms = max(1, math.ceil(self.duration * 1000))
        return bool(client.set(f"{settings.CHAT_REDIS_PREFIX}:{marker}", 1, nx=True, px=window_ms))


class AuditedRefusals:
    """A login limit's refusals in the audit trail (LOGIN_THROTTLED) and the security log, at
    most once a window per counter: the first refusal marks the counter for a window's length,
    so a guesser who keeps on hammering writes a row a window (per address, or per account),
    not a row a request. Without it, a brute force left only
    the LOGIN_FAILED rows of the attempts the limit let through, and then silence."""

    limit_name = ""  # what the counter is per: "address" or "account"

    def allow_request(self, request, view):
        if super().allow_request(request, view):
            return True
        try:
            first = self.first_refusal_in_window()
        except (RedisError, OSError):
            first = True  # a row too many rather than a refusal unrecorded
        if first:
            self._record_refusal(request)
        return False

    def _record_refusal(self, request) -> None:
        ip = client_ip_from_request(request)
        details = {"limit": self.limit_name, "rate": self.rate, "path": request.path[:200]}
        username = self.attempted_username(request)
        if username is not None:
            # Not validated yet: a NUL or a lone surrogate would make PostgreSQL refuse the row
            # (jsonb), and the refusal a 500; and no longer than a username can be.
            username = username[:150].encode("utf-8", "replace").decode().replace("\x00", "\ufffd")
            details["username"] = username
        audit.security_logger.warning(
            "sign-ins throttled per %s (%s): ip=%s username=%r",
            self.limit_name,
            self.rate,
            ip,
            username,
        )
        try:
            audit.security_event(
                event=audit.Event.LOGIN_THROTTLED,
                ip=ip,
                reason=f"sign-in attempts per {self.limit_name} over {self.rate}",
                details=details,
            )
        except DatabaseError as error:
            # The refusal stands (429, not a 500) and the line above says it; the window's mark
            # stays, so a database that keeps failing costs one attempt a window, not a request.
            logger.error("sign-in refusal not audited: %s", type(error).__name__)

    def attempted_username(self, request) -> str | None:
        return None


class LoginIPThrottle(FailClosed, AuditedRefusals, AtomicRateThrottle):
    scope = "login_ip"
    limit_name = "address"

    def get_cache_key(self, request, view):
        # Not DRF's get_ident: that trusts X-Forwarded-For by position, not by proxy.
        ident = limit_key(client_ip_from_request(request))
        return self.cache_format % {"scope": self.scope, "ident": ident}


class LoginUsernameThrottle(FailClosed, AuditedRefusals, AtomicRateThrottle):
    """Slows guessing at one account from many IPs."""

    scope = "login_user"
    limit_name = "account"

    def get_cache_key(self, request, view):
        username = self.attempted_username(request)
        if not username:
            return None
        # Hashed: the username is any string the client sent (unvalidated yet), and Redis cannot
        # encode a lone surrogate (HTTP 500); control characters break memcached keys.
        ident = hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}

    def attempted_username(self, request) -> str | None:
        """The account the attempt names, as its counter knows it (login_username)."""
        return login_username(
            request.data.get("username") if hasattr(request.data, "get") else None
        )


def login_username(value) -> str | None:
    """The account a login attempt names, in one form for every way of writing it, so that they
    share a counter: what DRF's CharField makes of it for the API (a number as its string,
    whitespace stripped) and Django's UsernameField for the forms (stripped and NFKC), folded
    to one case. None if no login can be made of it. Keyed on the raw value, " alice", "alice\t"
    and 123 each had a counter of their own (or none) while reaching the same account."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    name = str(value).strip()
    if len(name) > get_user_model()._meta.get_field("username").max_length:
        # No account has so long a name, and NFKC can make a string 18 times longer (Django's
        # UsernameField skips it too): counted as sent, in linear time.
        return name.casefold()
    return unicodedata.normalize("NFKC", name).strip().casefold() or None


class TicketThrottle(FailClosed, AtomicRateThrottle, UserRateThrottle):
    scope = "tickets"


class ApiThrottle(AtomicRateThrottle):
    """Every API request that has no limit of its own (REST_FRAMEWORK's default throttle): per
    user once authenticated, else per client IP. Against a client that hammers the database
    through the API; the ticket and login views have their own, stricter limits instead.

    Unlike those it lets requests through while Redis is down (with a warning a minute): it
    guards capacity, not credentials, and logging out (which ends a stolen login) must work
    during an outage.
    """

    scope = "api"
    by_address = False  # key by the client IP whoever the user (refused credentials)

    def allow_request(self, request, view):
        try:
            return super().allow_request(request, view)
        except (RedisError, OSError) as error:
            _warn_unlimited(error)
            return True

    @classmethod
    def count_refused_credentials(cls, request) -> None:
        """A request whose credentials were refused takes its place in its address's budget,
        as an anonymous one; over it, 429 instead of 401 (Throttled).

        DRF authenticates before it throttles, and a refusal ends the request: without this, a
        client with a revoked or expired token was never limited. The token is checked first
        (a 429 costs what the 401 did); `request.user` is not known here (reading it would
        authenticate again), so the key is the address.
        """
        throttle = cls()
        throttle.by_address = True
        if not throttle.allow_request(request, None):
            raise Throttled(wait=throttle.wait())

    def get_cache_key(self, request, view):
        if not self.by_address and request.user and request.user.is_authenticated:
            ident = f"user-{request.user.pk}"
        else:
            ident = f"ip-{limit_key(client_ip_from_request(request))}"
        return self.cache_format % {"scope": self.scope, "ident": ident}


class UserPostThrottle(FailClosed, AtomicRateThrottle, UserRateThrottle):
    """A user's POSTs to a view that also answers reads, which it does not limit (the view
    answers the anonymous before throttling)."""

    def get_cache_key(self, request, view):
        if request.method != "POST":
            return None
        return super().get_cache_key(request, view)


class RoomCreateThrottle(UserPostThrottle):
    """Rooms created, per user. A public room is in everyone's list (`GET /api/rooms/`, which
    the rooms page asks for again every few seconds): without this one account could grow
    every user's list by hundreds of rooms a minute."""

    scope = "room_create"


class MessagePostThrottle(UserPostThrottle):
    """Messages posted through the API, per user. A socket's messages take tokens from the
    user's bucket in chat.state (CHAT_MESSAGE_RATE/BURST); without this, the API was a way
    around that limit: every message posted is stored and sent to every member of the room."""

    scope = "rest_messages"


_unlimited_warned_at = -math.inf


def _warn_unlimited(error: Exception) -> None:
    global _unlimited_warned_at
    now = time.monotonic()
    if now - _unlimited_warned_at >= 60:
        _unlimited_warned_at = now
        logger.warning("API requests are not limited while Redis fails: %s", type(error).__name__)


class FirstRefusal:
    """For a view with several throttles: stop at the first that refuses. DRF asks each even
    once one has refused, and each records the request, so a login refused for its IP still
    used up the username's budget (and its owner's), and "refused requests are not counted"
    did not hold."""

    def check_throttles(self, request):
        refused = first_refusal(self.get_throttles(), request, self)
        if refused is not None:
            self.throttled(request, refused.wait())


def first_refusal(throttles, request, view):
    """The first of `throttles` that refuses the request, asking none after it; or None."""
    for throttle in throttles:
        if not throttle.allow_request(request, view):
            return throttle
    return None


class _FormPost:
    """A Django request as the login throttles read it: `data` is the posted form."""

    def __init__(self, request) -> None:
        self._request = request
        self.data = request.POST

    def __getattr__(self, name):
        return getattr(self._request, name)


def throttle_login(view):
    """The API login's limits (per IP and per username, same counters) on a form login view.

    Django's own LoginView and the admin's login are not DRF views, so DRF's throttles do not
    reach them; without this, /login/ and /admin/login/ would be an unthrottled way around the
    limits of /api/auth/token/. Only POSTs count; a refused one gets 429 with Retry-After (503
    when the counters cannot be reached) and never reaches the password check.
    """

    @functools.wraps(view)
    def wrapped(request, *args, **kwargs):
        if request.method != "POST":
            return view(request, *args, **kwargs)
        try:
            # As the API's login (FirstRefusal): the first refusal ends it.
            refused = first_refusal(
                (LoginIPThrottle(), LoginUsernameThrottle()), _FormPost(request), None
            )
        except ThrottleUnavailable:
            return _refusal(request, 503, "Sign-in is temporarily unavailable; try again shortly.")
        if refused is not None:
            wait = max(1, math.ceil(refused.wait() or 1))
            response = _refusal(
                request, 429, f"Too many sign-in attempts. Try again in {wait} seconds."
            )
            response["Retry-After"] = str(wait)
            return response
        return view(request, *args, **kwargs)

    return wrapped


def _refusal(request, status_code: int, message: str) -> HttpResponse:
    body = render_to_string("registration/login_refused.html", {"message": message}, request)
    return HttpResponse(body, status=status_code)
