"""Throttles keyed by what an attacker cannot choose: the resolved client IP, the account."""

import hashlib

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
