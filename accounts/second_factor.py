"""Whether the credential a user acts with passed a second factor (TOTP or a backup code).

The admin asks for one (CHAT_ADMIN_REQUIRE_OTP); staff powers in the rooms (every room seen,
every room moderated, chat.permissions) ask for the same, whatever the way in: a stolen staff
password alone must not reach through the API or a socket what it cannot reach in the admin.

Each way in marks the user object it authenticates, as django-otp's OTPMiddleware marks a
session's (`user.is_verified()`): a JWT by its login's claim, a socket by its ticket's.
"""

from django_otp import match_token
from django_otp.models import Device

# In a login's refresh and access tokens (simplejwt copies it, and keeps it across rotation):
# the persistent id of the device that verified the login. A ticket issued to such a login
# carries `True`: its request checked the device already.
OTP_CLAIM = "otp"


def is_verified(user) -> bool:
    """Did the credential `user` acts with pass a second factor? False when nobody said so."""
    check = getattr(user, "is_verified", None)
    return bool(check is not None and check())


def mark(user, verified: bool) -> None:
    """Say what the credential `user` was authenticated with passed (as OTPMiddleware does)."""
    user.is_verified = lambda: verified


def verify_token(user, token: str) -> Device | None:
    """The confirmed device of `user`'s that `token` verifies on (TOTP code or backup code), or
    None. Each device counts failures and throttles itself (django-otp)."""
    return match_token(user, token) if token else None


def device_holds(user, persistent_id) -> bool:
    """Is the device that verified a login still `user`'s, and confirmed? As OTPMiddleware
    asks of a session's device on each request: a device removed (a lost phone replaced with
    `enroll_totp --replace`) takes its logins' staff powers with it."""
    if not isinstance(persistent_id, str):
        return False
    try:
        device = Device.from_persistent_id(persistent_id)
    except AttributeError:  # a model that is no device (django-otp filters None)
        return False
    return device is not None and device.user_id == user.pk and device.confirmed
