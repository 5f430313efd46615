"""The admin site: staff sign in with a password and a TOTP token (CHAT_ADMIN_REQUIRE_OTP)."""

from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.admin.forms import AdminAuthenticationForm
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

    def has_permission(self, request):
        if settings.CHAT_ADMIN_REQUIRE_OTP:
            return super().has_permission(request)
        return AdminSite.has_permission(self, request)
