"""Whether the credential a user acts with passed a second factor (TOTP or a backup code).

The admin asks for one (CHAT_ADMIN_REQUIRE_OTP); staff powers in the rooms (every room seen,
every room moderated, chat.permissions) ask for the same, whatever the way in: a stolen staff
password alone must not reach through the API or a socket what it cannot reach in the admin.

Each way in marks the user object it authenticates, as django-otp's OTPMiddleware marks a
session's (`user.is_verified()`): a JWT by its login's claim, a socket by its ticket's.
"""

from django_otp import match_token
from django_otp.models import Device

# The persistent id of the device that verified a login: in the login's refresh and access
# tokens (simplejwt copies it, and keeps it across rotation) and in the tickets issued to it.
# Checked (device_holds) wherever a credential carrying it is used.
OTP_CLAIM = "otp"


def is_verified(user) -> bool:
    """Did the credential `user` acts with pass a second factor? False when nobody said so."""
    check = getattr(user, "is_verified", None)
    return bool(check is not None and check())


def mark(user, claim) -> None:
    """Say which device, if any, verified the credential `user` was authenticated with: the
    one a token's claim names, if it still holds. As OTPMiddleware says it of a session's
    user (`otp_device`)."""
    device_id = claim if claim and device_holds(user, claim) else None
    user.otp_device_id = device_id
    user.is_verified = lambda: device_id is not None


def verified_device(user) -> str | None:
    """The persistent id of the device that verified `user`'s credential: marked here (a JWT,
    a ticket) or by OTPMiddleware (a session); None if none did."""
    if not is_verified(user):
        return None
    device_id = getattr(user, "otp_device_id", None)
    if device_id is None and getattr(user, "otp_device", None) is not None:
        device_id = user.otp_device.persistent_id
    return device_id


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
