"""Throttles keyed by what an attacker cannot choose: the resolved client IP, the account."""

import functools
import hashlib
import math

from django.http import HttpResponse
from django.template.loader import render_to_string
from redis.exceptions import RedisError
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.throttling import SimpleRateThrottle, UserRateThrottle

from accounts.ip import client_ip_from_request


class ThrottleUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Temporarily unavailable; try again shortly."
    default_code = "unavailable"


class FailClosed:
    """Throttle counters live in the cache (Redis in production). If it cannot be reached, refuse
    with 503 rather than a 500, and never let requests through unthrottled."""

    def allow_request(self, request, view):
        try:
            return super().allow_request(request, view)
        except (RedisError, OSError) as error:
            raise ThrottleUnavailable() from error


class LoginIPThrottle(FailClosed, SimpleRateThrottle):
    scope = "login_ip"

    def get_cache_key(self, request, view):
        # Not DRF's get_ident: that trusts X-Forwarded-For by position, not by proxy.
        return self.cache_format % {"scope": self.scope, "ident": client_ip_from_request(request)}


class LoginUsernameThrottle(FailClosed, SimpleRateThrottle):
    """Slows guessing at one account from many IPs."""

    scope = "login_user"

    def get_cache_key(self, request, view):
        username = request.data.get("username") if hasattr(request.data, "get") else None
        if not isinstance(username, str) or not username:
            return None
        # Hashed: the username is any string the client sent (unvalidated yet), and Redis cannot
        # encode a lone surrogate (HTTP 500); control characters break memcached keys.
        ident = hashlib.sha256(username.lower().encode("utf-8", "surrogatepass")).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}


class TicketThrottle(FailClosed, UserRateThrottle):
    scope = "tickets"


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
        posted = _FormPost(request)
        waits = []
        try:
            for throttle in (LoginIPThrottle(), LoginUsernameThrottle()):
                if not throttle.allow_request(posted, None):
                    waits.append(throttle.wait() or 1)
        except ThrottleUnavailable:
            return _refusal(request, 503, "Sign-in is temporarily unavailable; try again shortly.")
        if waits:
            wait = max(1, math.ceil(max(waits)))
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
