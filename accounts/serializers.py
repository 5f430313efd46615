"""Request and response shapes of the accounts API."""

from django.contrib.auth import get_user_model
from rest_framework import serializers
from rest_framework_simplejwt import serializers as jwt_serializers
from rest_framework_simplejwt.exceptions import InvalidToken
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import RefreshToken
from rest_framework_simplejwt.utils import get_md5_hash_password

from accounts.tokens import ChatRefreshToken

User = get_user_model()


class TokenObtainPairSerializer(jwt_serializers.TokenObtainPairSerializer):
    token_class = ChatRefreshToken


class TokenRefreshSerializer(jwt_serializers.TokenRefreshSerializer):
    """Refresh with rotation; a token minted before the user's last password change is refused."""

    def validate(self, attrs):
        refresh = RefreshToken(attrs["refresh"])
        user = User.objects.filter(
            **{jwt_settings.USER_ID_FIELD: refresh.get(jwt_settings.USER_ID_CLAIM)}
        ).first()
        if user is None or not user.is_active:
            raise InvalidToken("No active account found for the given token.")
        claim = refresh.get(jwt_settings.REVOKE_TOKEN_CLAIM)
        if jwt_settings.CHECK_REVOKE_TOKEN and claim != get_md5_hash_password(user.password):
            raise InvalidToken("The user's password has changed since this token was issued.")
        return super().validate(attrs)


class LogoutSerializer(serializers.Serializer):
    refresh = serializers.CharField()


class TicketRequestSerializer(serializers.Serializer):
    room = serializers.CharField(max_length=50)


class TicketSerializer(serializers.Serializer):
    ticket = serializers.CharField(help_text="Present it once, within its lifetime; never log it.")
    expires_at = serializers.DateTimeField()
    ws_url = serializers.CharField(help_text="Path of the room's WebSocket, e.g. /ws/rooms/lobby/")


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField()
