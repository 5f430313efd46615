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
