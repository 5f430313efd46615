"""The admin site: staff sign in with a password and a TOTP token (CHAT_ADMIN_REQUIRE_OTP)."""

from functools import wraps

from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import BadRequest, ValidationError
from django_otp.admin import OTPAdminAuthenticationForm, OTPAdminSite

from accounts.ip import client_ip_from_request
from accounts.throttling import throttle_login
from chat import audit


class SecondFactorSignInForm(OTPAdminAuthenticationForm):
    """django-otp's sign-in form. A one-time code offered once the password has passed, and
    refused, is a failed sign-in, audited as the API audits it (accounts.api.LoginView): a
    wrong password is audited by Django's signal, a wrong code sends none."""

    def clean_otp(self, user):
        try:
            super().clean_otp(user)
        except ValidationError:
            if user is not None and self.cleaned_data.get("otp_token"):
                audit.security_event(
                    event=audit.Event.LOGIN_FAILED,
                    target=user,
                    ip=client_ip_from_request(self.request),
                    reason="bad second factor",
                    details={"username": user.get_username(), "method": "session"},
                )
            raise


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
            SecondFactorSignInForm if settings.CHAT_ADMIN_REQUIRE_OTP else AdminAuthenticationForm
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
