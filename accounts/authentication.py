"""JWT authentication that also refuses the access tokens of a login that has been logged out."""

from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken

from accounts import services
from accounts.tokens import FAMILY_CLAIM


class ChatJWTAuthentication(JWTAuthentication):
    def get_validated_token(self, raw_token):
        token = super().get_validated_token(raw_token)
        family = token.get(FAMILY_CLAIM)
        if family and services.login_has_ended(services.credential_for_jwt(family)):
            raise InvalidToken({"detail": "this login has ended; sign in again"})
        return token


class ChatJWTScheme(SimpleJWTScheme):
    """The OpenAPI description of it: simplejwt's Bearer scheme (drf-spectacular)."""

    target_class = ChatJWTAuthentication
