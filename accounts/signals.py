"""Audit Django's own authentication events (logins through any path, session logouts)."""

from types import SimpleNamespace

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import is_password_usable
from django.contrib.auth.models import Group, Permission
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver
from django_otp.plugins.otp_static.models import StaticDevice
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework_simplejwt.token_blacklist.models import OutstandingToken

from accounts.ip import client_ip_from_request
from accounts.services import credential_for_session, token_digest
from chat import audit
from chat import services as chat_services


def _ip(request):
    return client_ip_from_request(request) if request is not None else None


@receiver(user_logged_in, dispatch_uid="audit-login-succeeded")
def audit_login(sender, request, user, **kwargs):
    audit.security_event(
        event=audit.Event.LOGIN_SUCCEEDED,
        actor=user,
        target=user,
        ip=_ip(request),
        details={"method": "session"},
    )


@receiver(user_login_failed, dispatch_uid="audit-login-failed")
def audit_login_failed(sender, credentials, request=None, **kwargs):
    # Django has already masked the password in `credentials`; we keep only the username tried.
    username = str(credentials.get("username", ""))[:150]
    audit.security_event(
        event=audit.Event.LOGIN_FAILED,
        ip=_ip(request),
        details={"username": username},
        reason="bad credentials",
    )


@receiver(user_logged_out, dispatch_uid="audit-logout")
def audit_logout(sender, request, user, **kwargs):
    if user is None:
        return
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    chat_services.user_logged_out(
        user=user,
        credential=credential_for_session(session_key) if session_key else "",
        method="session",
        ip=_ip(request),
    )


@receiver(pre_save, sender=OutstandingToken, dispatch_uid="outstanding-token-digest")
def store_refresh_token_digest(sender, instance, **kwargs):
    """simplejwt keeps each refresh token in clear for its blacklist; keep a digest instead.

    Only the jti is ever looked up, so the digest loses nothing and a database leak yields no
    usable refresh tokens.
    """
    if instance.token and not instance.token.startswith("sha256:"):
        instance.token = token_digest(instance.token)


# A password change or a deactivation must end the user's sockets however it happens: through
# the admin's forms, `manage.py changepassword`, Django's password views or the shell. The
# services that deactivate users do it themselves (queryset updates send no signals).
_CREDENTIAL_FIELDS = ("password", "is_active", "is_staff", "is_superuser")
_UNPRIVILEGED = {"is_staff": False, "is_superuser": False}


@receiver(pre_save, sender=get_user_model(), dispatch_uid="user-credentials-before")
def remember_credentials(sender, instance, update_fields=None, **kwargs):
    instance._credentials_before = _stored(sender, instance, _CREDENTIAL_FIELDS, update_fields)


def _stored(sender, instance, fields, update_fields) -> dict | None:
    """The stored values of `fields`, read in pre_save for post_save to compare with; None for
    a new row, or a save that writes none of them."""
    if instance._state.adding or (update_fields and not set(fields) & set(update_fields)):
        return None
    return sender.objects.filter(pk=instance.pk).values(*fields).first()


@receiver(post_save, sender=get_user_model(), dispatch_uid="user-credentials-after")
def credentials_changed(sender, instance, created, update_fields=None, **kwargs):
    before = instance.__dict__.pop("_credentials_before", None)
    if created:
        # An account made privileged (createsuperuser, the shell) is granted them as it is made.
        before = {"password": instance.password, "is_active": instance.is_active, **_UNPRIVILEGED}
    if before is None:
        return
    password_changed = before["password"] != instance.password and not _hash_upgrade(
        instance, update_fields
    )
    deactivated = before["is_active"] and not instance.is_active
    privileges = {
        name: [before[name], getattr(instance, name)]
        for name in ("is_staff", "is_superuser")
        if before[name] != getattr(instance, name)
    }
    if password_changed or deactivated or privileges:
        chat_services.user_credentials_changed(
            user=instance,
            password_changed=password_changed,
            deactivated=deactivated,
            privileges=privileges,
            actor=audit.acting_user(),
        )


# Permissions and groups are many-to-many: saving a user sends no save signal for them. What a
# grant or a removal changed, by user (or group), is audited like a staff flag.
_M2M_NAMES = {"post_add": "added", "post_remove": "removed", "post_clear": "removed"}


def _labels(model, pks) -> list[str]:
    if model is Permission:
        rows = Permission.objects.filter(pk__in=pks).select_related("content_type")
        return sorted(f"{p.content_type.app_label}.{p.codename}" for p in rows)
    return sorted(model.objects.filter(pk__in=pks).values_list("name", flat=True))


def _user_m2m_changed(field: str):
    def changed(sender, instance, action, reverse, model, pk_set, **kwargs):
        if action == "pre_clear":
            # What a clear removes is gone by post_clear: remember it (the user's permissions
            # or groups; or, from the other side, the permission's or group's users).
            related = instance.user_set if reverse else getattr(instance, field)
            instance._cleared = set(related.values_list("pk", flat=True))
            return
        if action not in _M2M_NAMES:
            return
        if action == "post_clear":
            pk_set = instance.__dict__.pop("_cleared", set())
        if not pk_set:
            return
        if reverse:  # permission.user_set.add(user): `instance` is the permission or group
            users = list(get_user_model().objects.filter(pk__in=pk_set))
            labels = _labels(type(instance), [instance.pk])
        else:
            users, labels = [instance], _labels(model, pk_set)
        for user in users:
            audit.security_event(
                event=audit.Event.PRIVILEGES_CHANGED,
                actor=audit.acting_user(),
                target=user,
                details={field: {_M2M_NAMES[action]: labels}},
            )

    return changed


def _group_permissions_changed(sender, instance, action, reverse, model, pk_set, **kwargs):
    if action not in ("post_add", "post_remove") or not pk_set or reverse:
        return
    audit.security_event(
        event=audit.Event.PRIVILEGES_CHANGED,
        actor=audit.acting_user(),
        details={
            "group": instance.name,
            "permissions": {_M2M_NAMES[action]: _labels(model, pk_set)},
        },
    )


_User = get_user_model()
m2m_changed.connect(
    _user_m2m_changed("user_permissions"),
    sender=_User.user_permissions.through,
    dispatch_uid="user-permissions-changed",
    weak=False,
)
m2m_changed.connect(
    _user_m2m_changed("groups"),
    sender=_User.groups.through,
    dispatch_uid="user-groups-changed",
    weak=False,
)
m2m_changed.connect(
    _group_permissions_changed,
    sender=Group.permissions.through,
    dispatch_uid="group-permissions-changed",
)


# Deleting a group takes it, and its permissions, from its members: the database cascade sends no
# m2m_changed, so each member is audited as removed from it.
@receiver(pre_delete, sender=Group, dispatch_uid="group-members-before-delete")
def remember_group_members(sender, instance, **kwargs):
    instance._members = list(instance.user_set.all())


@receiver(post_delete, sender=Group, dispatch_uid="group-deleted")
def group_deleted(sender, instance, **kwargs):
    for user in instance.__dict__.pop("_members", []):
        audit.security_event(
            event=audit.Event.PRIVILEGES_CHANGED,
            actor=audit.acting_user(),
            target=user,
            details={"groups": {"removed": [instance.name]}},
        )


@receiver(post_delete, sender=get_user_model(), dispatch_uid="user-deleted")
def user_deleted(sender, instance, **kwargs):
    chat_services.user_deleted(user=instance, actor=audit.acting_user())


def _hash_upgrade(user, update_fields) -> bool:
    """Django re-hashing the same password at login (stronger hasher or more iterations).

    check_password's setter calls set_password, clears `_password` ("hash upgrades shouldn't be
    considered password changes") and saves only the password; a real change through
    set_password saves with `_password` still set.
    """
    return (
        user._password is None
        and update_fields is not None
        and set(update_fields) == {"password"}
        and is_password_usable(user.password)  # set_unusable_password() is no upgrade
    )


# A device that verifies logins (accounts.second_factor) is audited as it becomes a user's
# confirmed device and as it stops being one. When it stops, their sockets, opened with staff
# powers, close; the logins' own tokens lose the powers at their next request (the device is
# looked up), and a session's at its next request (OTPMiddleware). Deleting a backup device's
# codes ends nothing (a code is spent by the sign-in it verified): remove the device.
# QuerySet.update() sends no signal.
_DEVICES = (TOTPDevice, StaticDevice)


def _device_owner(user_id: int):
    # The user row, for the audit row's snapshot of the name; a bare key if it is already gone.
    return get_user_model().objects.filter(pk=user_id).first() or SimpleNamespace(
        pk=user_id, username=""
    )


def _second_factor(device, user_id: int, *, added: bool) -> None:
    chat_services.second_factor_changed(
        user=_device_owner(user_id), device=device, added=added, actor=audit.acting_user()
    )


def second_factor_removed(sender, instance, **kwargs):
    if instance.confirmed:  # an unconfirmed device never verified anything
        _second_factor(instance, instance.user_id, added=False)


def remember_device(sender, instance, update_fields=None, **kwargs):
    instance._device_before = _stored(sender, instance, ("user", "confirmed"), update_fields)


def device_changed(sender, instance, created, **kwargs):
    before = instance.__dict__.pop("_device_before", None)
    if created:
        if instance.confirmed:
            _second_factor(instance, instance.user_id, added=True)
        return
    if before is None:  # a save that wrote neither the user nor `confirmed`
        return
    was = before["user"] if before["confirmed"] else None
    now = instance.user_id if instance.confirmed else None
    if was != now:
        if was is not None:
            _second_factor(instance, was, added=False)
        if now is not None:
            _second_factor(instance, now, added=True)


for _device in _DEVICES:
    _uid = _device._meta.model_name
    post_delete.connect(second_factor_removed, sender=_device, dispatch_uid=f"{_uid}-removed")
    pre_save.connect(remember_device, sender=_device, dispatch_uid=f"{_uid}-before")
    post_save.connect(device_changed, sender=_device, dispatch_uid=f"{_uid}-changed")
