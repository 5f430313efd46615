"""JWT authentication that also refuses the access tokens of a login that has been logged out,
and session authentication that refuses a page's request once the session is someone else's."""

from urllib.parse import unquote

from django.utils.translation import gettext_lazy as _
from drf_spectacular.authentication import SessionScheme
from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken
from rest_framework_simplejwt.settings import api_settings as jwt_settings

from accounts import second_factor, services
from accounts.throttling import ApiThrottle
from accounts.tokens import FAMILY_CLAIM, claimed_user_id
from chat import sql

# simplejwt's own message for it (JWTAuthentication.get_user).
NO_USER_ID = _("Token contained no recognizable user identification")


class ChatJWTAuthentication(JWTAuthentication):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.user_model = UsersByKey(self.user_model)

    def authenticate(self, request):
        try:
            found = super().authenticate(request)
        except AuthenticationFailed:
            ApiThrottle.count_refused_credentials(request)
            raise
        if found is not None:
            user, token = found
            # A statement more, for the logins that passed a second factor only (staff).
            second_factor.mark(user, token.get(second_factor.OTP_CLAIM))
        return found

    def get_validated_token(self, raw_token):
        token = super().get_validated_token(raw_token)
        family = token.get(FAMILY_CLAIM)
        credential = services.credential_for_jwt(family) if family else None
        claim = token.get(jwt_settings.USER_ID_CLAIM)
        if claimed_user_id(claim) is None:
            raise InvalidToken(NO_USER_ID)  # a 401 before any lookup, as get_user's own
        # The user get_user is about to look up (by the claim as it is), read with the login's
        # end: one statement.
        where = {jwt_settings.USER_ID_FIELD: claim}
        user, ended = services.jwt_user_and_login(where=where, credential=credential)
        self.user_model.read(where, user)
        if ended:
            raise InvalidToken({"detail": "this login has ended; sign in again"})
        return token


class UsersByKey:
    """The user model as simplejwt's `get_user` uses it (`objects.get(id=...)`, `DoesNotExist`),
    with the one lookup by key read through chat.sql, or already read with the login's end.

    Every API request makes it, and on a ticket request the ORM's `get()` cost twice what the
    rest of the authentication did (docs/performance.md, handshakes). simplejwt's own checks
    (user found, active, password unchanged since the token) still run, in its `get_user`.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.DoesNotExist = self.model.DoesNotExist
        self.objects = self
        self._read: tuple[dict, object] | None = None

    def read(self, where: dict, user) -> None:
        """The answer (a user or None) to the next `get(**where)`, read already."""
        self._read = (where, user)

    def get(self, **where):
        read, self._read = self._read, None
        user = read[1] if read is not None and read[0] == where else sql.get(self.model, **where)
        if user is None:
            raise self.DoesNotExist
        return user


class ChatJWTScheme(SimpleJWTScheme):
    """The OpenAPI description of it: simplejwt's Bearer scheme (drf-spectacular)."""

    target_class = ChatJWTAuthentication


class ChatSessionAuthentication(SessionAuthentication):
    """DRF's session authentication (the pages), with one check more: a page names the user it
    was opened for (`X-Chat-User`, static/chat/api.js). Signed out in another tab and signed in
    there as someone else, the browser's session is theirs, and a page left open would act as
    them (mark read, moderate, ask for tickets): such a request is refused (401 user_changed)."""

    def authenticate(self, request):
        found = super().authenticate(request)
        page_user = request.headers.get("X-Chat-User")
        if (
            found is not None
            and page_user is not None
            and unquote(page_user) != found[0].get_username()
        ):
            raise AuthenticationFailed(
                "This page was opened for another user: reload it.", code="user_changed"
            )
        return found


class ChatSessionScheme(SessionScheme):
    """The OpenAPI description of it: DRF's session cookie scheme (drf-spectacular)."""

    target_class = ChatSessionAuthentication
