"""Request and response shapes of the accounts API."""

import contextlib

from django.contrib.auth import get_user_model
from django.contrib.auth.models import update_last_login
from rest_framework import serializers
from rest_framework.exceptions import AuthenticationFailed
from rest_framework_simplejwt import serializers as jwt_serializers
from rest_framework_simplejwt.exceptions import InvalidToken, TokenError
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import RefreshToken
from rest_framework_simplejwt.utils import get_md5_hash_password

from accounts import second_factor, services
from accounts.ip import client_ip_from_request
from accounts.tokens import FAMILY_CLAIM, ChatRefreshToken
from chat import services as chat_services
from chatproject.rest import StringField

User = get_user_model()


class TokenObtainPairSerializer(jwt_serializers.TokenObtainPairSerializer):
    """Username and password, and for staff powers (CHAT_ADMIN_REQUIRE_OTP) a second factor:
    a code of the account's authenticator app or one of its backup codes (`manage.py
    enroll_totp`). Without one a staff account signs in as a plain user; a wrong one refuses
    the sign-in (401 `otp_invalid`)."""

    token_class = ChatRefreshToken
    otp_token = serializers.CharField(
        required=False,
        allow_blank=True,
        write_only=True,
        max_length=64,
        help_text="A TOTP or backup code, for staff powers; checked once the password is.",
    )

    def validate(self, attrs):
        # simplejwt's TokenObtainPairSerializer.validate, with the second factor checked once the
        # password has passed and before the tokens are signed (get_token is a classmethod, and
        # callers use it as one: it cannot see the request's code).
        data = jwt_serializers.TokenObtainSerializer.validate(self, attrs)
        device = self._second_factor(attrs["otp_token"]) if attrs.get("otp_token") else None
        self.second_factor_passed = device is not None
        refresh = self.get_token(self.user)
        if device is not None:
            refresh[second_factor.OTP_CLAIM] = device.persistent_id
        data["refresh"] = str(refresh)
        data["access"] = str(refresh.access_token)
        if jwt_settings.UPDATE_LAST_LOGIN:
            update_last_login(None, self.user)
        return data

    def _second_factor(self, code: str):
        """The device `code` verifies on; else the sign-in is refused (the view audits it)."""
        device = second_factor.verify_token(self.user, code)
        if device is None:
            raise SecondFactorRefused(
                "The one-time code is wrong, used already, or its device is throttled.",
                code="otp_invalid",
            )
        return device


class SecondFactorRefused(AuthenticationFailed):
    """The password passed and the one-time code did not (401 `otp_invalid`)."""


class TokenRefreshSerializer(jwt_serializers.TokenRefreshSerializer):
    """Refresh with rotation, once per token; a token minted before the user's last password
    change, or of a login that has ended, is refused."""

    def validate(self, attrs):
        try:
            refresh = RefreshToken(attrs["refresh"])  # signature, expiry, blacklist
        except TokenError:
            # Refused either way; one presented past the grace of a race with its rotation ends
            # its login.
            request = self.context.get("request")
            chat_services.refresh_token_refused(
                token=attrs["refresh"],
                ip=client_ip_from_request(request) if request is not None else None,
            )
            raise
        user = User.objects.filter(
            **{jwt_settings.USER_ID_FIELD: refresh.get(jwt_settings.USER_ID_CLAIM)}
        ).first()
        if user is None or not user.is_active:
            raise InvalidToken("No active account found for the given token.")
        claim = refresh.get(jwt_settings.REVOKE_TOKEN_CLAIM)
        if jwt_settings.CHECK_REVOKE_TOKEN and claim != get_md5_hash_password(user.password):
            raise InvalidToken("The user's password has changed since this token was issued.")
        family = refresh.get(FAMILY_CLAIM)
        if family and services.login_has_ended(services.credential_for_jwt(family)):
            raise InvalidToken("This login has ended.")
        # simplejwt's rotation (TokenRefreshSerializer.validate, with ROTATE_REFRESH_TOKENS and
        # BLACKLIST_AFTER_ROTATION on, settings.py), except that it ignored whether its
        # blacklisting created the entry: two requests presenting one token at the same moment
        # both passed the check above and both rotated it, forking the login into two (a
        # logout ended one). The entry is unique per token: the second is refused as a reuse.
        _, created = refresh.blacklist()
        if not created:
            raise InvalidToken("Token is blacklisted")
        data = {"access": str(refresh.access_token)}
        refresh.set_jti()
        refresh.set_exp()
        refresh.set_iat()
        refresh.outstand()
        data["refresh"] = str(refresh)
        return data


class LogoutSerializer(serializers.Serializer):
    refresh = StringField()


class TicketRequestSerializer(serializers.Serializer):
    room = StringField(max_length=50)

    @classmethod
    def room_of(cls, data) -> str:
        """`validated_data["room"]` of `data`, or the serializer's own ValidationError.

        A JSON object's `room` goes through the field's own validation (the declared field:
        stripped, its length and characters checked), as the serializer would run it, without
        making a serializer (see TicketSerializer.body). Anything else, and a room the field
        refuses, goes through the serializer, for its exact errors. Tests hold the two equal,
        and the serializer free of validators the shortcut would skip.
        """
        if type(data) is dict and "room" in data:
            with contextlib.suppress(serializers.ValidationError):
                return _ROOM.run_validation(data["room"])
        found = cls(data=data)
        found.is_valid(raise_exception=True)
        return found.validated_data["room"]


class TicketSerializer(serializers.Serializer):
    ticket = serializers.CharField(help_text="Present it once, within its lifetime; never log it.")
    expires_at = serializers.DateTimeField()
    ws_url = serializers.CharField(help_text="Path of the room's WebSocket, e.g. /ws/rooms/lobby/")

    @staticmethod
    def body(*, ticket: str, expires_at, ws_url: str) -> dict:
        """What `TicketSerializer({...}).data` is, without a serializer per ticket request.

        A serializer deep-copies its declared fields when first used, on every ticket request:
        the two serializers take 59 µs in isolation, the shortcuts 7, and the server's CPU per
        ticket POST fell by more than that (docs/performance.md, the change table). A test holds
        the two equal.
        """
        return {
            "ticket": ticket,
            "expires_at": _DATETIME.to_representation(expires_at),
            "ws_url": ws_url,
        }


# Unbound: DRF's own DATETIME_FORMAT and current time zone, read at each call.
_DATETIME = serializers.DateTimeField()
_ROOM = TicketRequestSerializer._declared_fields["room"]


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField()
    errors = serializers.DictField(
        required=False,
        help_text="A request the serializers refused: every field's errors, by field "
        "(`detail` and `code` are the first of them).",
    )
