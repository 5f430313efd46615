"""Users and the server-side record of WebSocket tickets."""

from django.contrib.auth.models import AbstractUser
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.db import models
from django.utils import timezone
from django.utils.deconstruct import deconstructible
from django.utils.translation import gettext_lazy as _

from chat import sql


@deconstructible
class UsernameValidator(UnicodeUsernameValidator):
    """Django's characters (letters, digits and @.+-_), but not "." or "..": a URL's path
    segment of only those is resolved away by browsers (and by the URL standard when
    percent-encoded too), so the page's request for /api/rooms/<slug>/members/../ reached the
    room itself, and such a member could not be moderated."""

    regex = r"^(?!\.{1,2}\Z)[\w.@+-]+\Z"
    message = (
        "Enter a valid username. It may contain only letters, numbers, and @/./+/-/_ "
        'characters, and may not be "." or "..".'
    )


class User(AbstractUser):
    """A person who can sign in. Deactivate (is_active=False) rather than delete."""

    username_validator = UsernameValidator()
    username = models.CharField(
        _("username"),
        max_length=150,
        unique=True,
        help_text=_("Required. 150 characters or fewer. Letters, digits and @/./+/-/_ only."),
        validators=[username_validator],
        error_messages={"unique": _("A user with that username already exists.")},
    )

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"


# Both NULL while a ticket is neither used nor revoked.
_UNUSED_WHILE_NULL = ("used_at", "revoked_at")


class TicketQuerySet(models.QuerySet):
    """A ticket's life, written once: issued (usable), then used, revoked or expired.

    A used ticket stays "used" even if its login ended afterwards (revoked_at is then set too,
    to close a socket that was still joining): it did open a socket.
    """

    @staticmethod
    def state_conditions(now=None) -> dict[str, models.Q]:
        now = now or timezone.now()
        unused = models.Q(**{f"{name}__isnull": True for name in _UNUSED_WHILE_NULL})
        return {
            "issued": unused & models.Q(expires_at__gt=now),
            "used": models.Q(used_at__isnull=False),
            "expired": unused & models.Q(expires_at__lte=now),
            "revoked": models.Q(revoked_at__isnull=False, used_at__isnull=True),
        }

    def in_state(self, state: str, now=None) -> "TicketQuerySet":
        return self.filter(self.state_conditions(now)[state])

    def unused(self) -> "TicketQuerySet":
        """Neither used nor revoked (usable, or expired unused)."""
        return self.filter(**{f"{name}__isnull": True for name in _UNUSED_WHILE_NULL})

    def usable(self, now=None) -> "TicketQuerySet":
        return self.in_state("issued", now)

    def claim(self, pk, *, now, ip: str) -> bool:
        """Mark ticket `pk` used from `ip` if it is usable ("issued" above); True if it was.

        The single-use guarantee: one conditional UPDATE, so of concurrent claims one wins.
        Written with chat.sql rather than usable().update(): on every handshake the query
        compiler cost more than the statement.
        """
        return sql.update_if(
            self.model,
            pk,
            {"used_at": now, "used_ip": ip},
            null=_UNUSED_WHILE_NULL,
            later={"expires_at": now},
        )

    def spent(self, now=None) -> "TicketQuerySet":
        return self.exclude(self.state_conditions(now)["issued"])


class Ticket(models.Model):
    """One single-use WebSocket ticket issued to a user for one room from one IP.

    The ticket string is never stored: this row holds its id (jti) and what it is bound to, and
    `used_at` is set exactly once by the conditional UPDATE that redeems it.
    """

    jti = models.CharField("ticket id (jti)", max_length=64, unique=True)
    user = models.ForeignKey(
        User, on_delete=models.CASCADE, related_name="tickets", verbose_name="user"
    )
    room = models.ForeignKey(
        "chat.Room", on_delete=models.CASCADE, related_name="tickets", verbose_name="room"
    )
    ip = models.GenericIPAddressField("issued to IP")
    user_agent = models.CharField("user agent", max_length=256, blank=True)
    # What authenticated the request for the ticket: "session:<hash>" or "jwt:<family id>".
    # Open sockets are closed when that credential ends (logout, refresh blacklisted).
    credential = models.CharField("credential", max_length=80, blank=True)
    issued_at = models.DateTimeField("issued at", default=timezone.now)
    expires_at = models.DateTimeField("expires at", db_index=True)
    used_at = models.DateTimeField("used at", null=True, blank=True)
    used_ip = models.GenericIPAddressField("used from IP", null=True, blank=True)
    revoked_at = models.DateTimeField("revoked at", null=True, blank=True)

    objects = TicketQuerySet.as_manager()

    class Meta:
        verbose_name = "ticket"
        verbose_name_plural = "tickets"
        ordering = ["-issued_at"]
        indexes = [models.Index(fields=["used_at"], name="ticket_used_idx")]

    def __str__(self) -> str:
        return f"ticket {self.jti[:8]}… for {self.user_id} in room {self.room_id}"

    @property
    def state(self) -> str:
        """The row's state, by the same rules as TicketQuerySet.state_conditions."""
        if self.used_at:
            return "used"
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "issued"


class EndedLogin(models.Model):
    """A login that was logged out while something it obtained still lives.

    A JWT login (token family): logging out blacklists the refresh token, but an access token
    of that login stays valid until it expires (minutes): this row makes the API refuse it
    meanwhile, ticket requests included. Any login, a session's too: a ticket it obtained as it
    ended cannot open a socket (chat.selectors.socket_context). `cleanup_tickets` deletes rows
    once nothing of the login is left.
    """

    credential = models.CharField("credential", max_length=80, unique=True)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="+", verbose_name="user")
    ended_at = models.DateTimeField("ended at", default=timezone.now)
    expires_at = models.DateTimeField("kept until", db_index=True)

    class Meta:
        verbose_name = "ended login"
        verbose_name_plural = "ended logins"

    def __str__(self) -> str:
        return f"login {self.credential} of {self.user_id}, ended {self.ended_at:%Y-%m-%d %H:%M}"
