"""Whether the credential a user acts with passed a second factor (TOTP or a backup code).

The admin asks for one (CHAT_ADMIN_REQUIRE_OTP); staff powers in the rooms (every room seen,
every room moderated, chat.permissions) ask for the same, whatever the way in: a stolen staff
password alone must not reach through the API or a socket what it cannot reach in the admin.

Each way in marks the user object it authenticates, as django-otp's OTPMiddleware marks a
session's (`user.is_verified()`): a JWT by its login's claim, a socket by its ticket's.
"""

from django_otp import match_token

# In a login's refresh and access tokens (simplejwt copies it, and keeps it across rotation) and
# in the tickets issued to it: the login passed a second factor.
OTP_CLAIM = "otp"


def is_verified(user) -> bool:
    """Did the credential `user` acts with pass a second factor? False when nobody said so."""
    check = getattr(user, "is_verified", None)
    return bool(check is not None and check())


def mark(user, verified: bool) -> None:
    """Say what the credential `user` was authenticated with passed (as OTPMiddleware does)."""
    user.is_verified = lambda: verified


def verify_token(user, token: str) -> bool:
    """Does `token` verify on one of `user`'s confirmed devices (TOTP code or backup code)?
    Each device counts failures and throttles itself (django-otp)."""
    return bool(token) and match_token(user, token) is not None
