"""HTTP middleware of the project."""

from django.conf import settings

from accounts.ip import is_trusted_proxy

# Headers only a reverse proxy may set. Django believes X-Forwarded-Proto (SECURE_PROXY_SSL_HEADER)
# and X-Forwarded-Host/Port (USE_X_FORWARDED_*) from anyone; we believe them from trusted proxies.
_PROXY_HEADERS = ("HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PORT")


class UntrustedProxyHeadersMiddleware:
    """Drops proxy headers that do not come from a peer in CHAT_TRUSTED_PROXIES."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not is_trusted_proxy(request.META.get("REMOTE_ADDR"), settings.CHAT_TRUSTED_PROXIES):
            for header in _PROXY_HEADERS:
                request.META.pop(header, None)
        return self.get_response(request)


class SyncChainMiddleware:
    """Does nothing; being sync-only and innermost, it makes Django run the middleware chain sync.

    For requests to async views (/healthz, /metrics), which chatproject.handlers leaves on
    Django's own async path: there Django runs each async-capable MiddlewareMixin's
    process_request and process_response through sync_to_async, two thread hops per middleware,
    about fifteen per request. With a sync-only middleware innermost, every middleware outside it
    runs sync, and a request crosses threads three times in all.
    """

    sync_capable, async_capable = True, False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)
