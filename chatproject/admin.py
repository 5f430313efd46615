"""The admin site: staff sign in with a password and a TOTP token (CHAT_ADMIN_REQUIRE_OTP)."""

from functools import wraps

from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import BadRequest
from django_otp.admin import OTPAdminAuthenticationForm, OTPAdminSite

from accounts.throttling import throttle_login


class ChatAdminSite(OTPAdminSite):
    """django-otp's admin site, with the second factor switchable by setting.

    With CHAT_ADMIN_REQUIRE_OTP (on by default outside development) only a user verified by one
    of their OTP devices in this session is let in; enrol with `manage.py enroll_totp`.
    """

    site_header = "Chat administration"
    site_title = "Chat admin"

    def __init__(self, name="admin"):
        super().__init__(name)

    @property
    def login_form(self):
        return (
            OTPAdminAuthenticationForm
            if settings.CHAT_ADMIN_REQUIRE_OTP
            else AdminAuthenticationForm
        )

    @property
    def login_template(self):
        return "otp/admin111/login.html" if settings.CHAT_ADMIN_REQUIRE_OTP else None

    def login(self, request, extra_context=None):
        # The same per-IP and per-username limits as every other way to sign in.
        return throttle_login(super().login)(request, extra_context)

    def admin_view(self, view, cacheable=False):
        return super().admin_view(_refuse_nul_in_query(view), cacheable)

    def has_permission(self, request):
        if settings.CHAT_ADMIN_REQUIRE_OTP:
            return super().has_permission(request)
        return AdminSite.has_permission(self, request)


def _refuse_nul_in_query(view):
    """400 for a query string carrying a NUL, on every admin page behind the sign-in.

    PostgreSQL refuses NUL in text, so a list filter, a link's lookup (`?jti=`) or an
    autocomplete term with one failed its query with a 500; Django checks only the search box.
    """

    @wraps(view)
    def checked(request, *args, **kwargs):
        if any("\x00" in key or "\x00" in "".join(values) for key, values in request.GET.lists()):
            raise BadRequest("NUL in the query string")
        return view(request, *args, **kwargs)

    return checked
