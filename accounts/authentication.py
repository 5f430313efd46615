"""JWT authentication that also refuses the access tokens of a login that has been logged out."""

from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken

from accounts import services
from accounts.tokens import FAMILY_CLAIM
from chat import sql


class ChatJWTAuthentication(JWTAuthentication):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.user_model = UsersByKey(self.user_model)

    def get_validated_token(self, raw_token):
        token = super().get_validated_token(raw_token)
        family = token.get(FAMILY_CLAIM)
        if family and services.login_has_ended(services.credential_for_jwt(family)):
            raise InvalidToken({"detail": "this login has ended; sign in again"})
        return token


class UsersByKey:
    """The user model as simplejwt's `get_user` uses it (`objects.get(id=...)`, `DoesNotExist`),
    with the one lookup by key read through chat.sql.

    Every API request makes it, and on a ticket request the ORM's `get()` cost twice what the
    rest of the authentication did (docs/performance.md, handshakes). simplejwt's own checks
    (user found, active, password unchanged since the token) still run, in its `get_user`.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.DoesNotExist = self.model.DoesNotExist
        self.objects = self

    def get(self, **where):
        user = sql.get(self.model, **where)
        if user is None:
            raise self.DoesNotExist
        return user


class ChatJWTScheme(SimpleJWTScheme):
    """The OpenAPI description of it: simplejwt's Bearer scheme (drf-spectacular)."""

    target_class = ChatJWTAuthentication
