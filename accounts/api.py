"""Accounts API: JWT login, refresh and logout, and WebSocket tickets."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework_simplejwt import views as jwt_views
from rest_framework_simplejwt.exceptions import InvalidToken, TokenError

from accounts import serializers, services
from accounts.ip import client_ip_from_request
from accounts.throttling import (
    FirstRefusal,
    LoginIPThrottle,
    LoginUsernameThrottle,
    TicketThrottle,
)
from accounts.tokens import FAMILY_CLAIM
from chat import audit, permissions, selectors
from chat import services as chat_services

# Answers that carry a credential (tokens, tickets): never kept by any cache.
NO_STORE = {"Cache-Control": "no-store"}


def exception_handler(exc, context):
    """DRF's handler, every error answered `{"detail": text, "code": code}` (docs/protocol.md).

    A validation error's `detail` and `code` are its first error's (the field's name before
    the text), and `errors` keeps DRF's map of every field's errors. simplejwt's errors carry
    their code in the body already (`user_inactive`, `password_changed`, `token_not_valid`...):
    it is kept.
    """
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, ValidationError):
        field, text = _first_error(exc.detail)
        code = _first_error(exc.get_codes())[1]
        if field not in (None, "detail", api_settings.NON_FIELD_ERRORS_KEY):
            text = f"{field}: {text}"
        body = {"detail": text, "code": code}
        if isinstance(response.data, dict) and "detail" not in response.data:
            body["errors"] = response.data
        response.data = body
    elif response is not None and isinstance(response.data, dict) and "detail" in response.data:
        codes = exc.get_codes() if hasattr(exc, "get_codes") else None
        code = response.data.get("code")  # set by simplejwt's errors
        if not isinstance(code, str):
            code = codes if isinstance(codes, str) else "error"
        response.data = {"detail": str(response.data["detail"]), "code": str(code)}
    return response


def _first_error(errors, field: str | None = None) -> tuple[str | None, str]:
    """The first leaf of DRF's nested errors (dicts by field, lists), and its field's path."""
    if isinstance(errors, dict) and errors:
        name, inner = next(iter(errors.items()))
        return _first_error(inner, name if field is None else f"{field}.{name}")
    if isinstance(errors, list) and errors:
        return _first_error(errors[0], field)
    if isinstance(errors, dict | list):  # empty: DRF never makes one, but say something
        return field, "invalid"
    return field, str(errors)


class LoginView(FirstRefusal, jwt_views.TokenObtainPairView):
    """Exchange a username and password for an access and a refresh token."""

    throttle_classes = [LoginIPThrottle, LoginUsernameThrottle]

    def post(self, request, *args, **kwargs):
        # simplejwt's own post, keeping the serializer: its `user` is the account that signed
        # in (the username as sent may differ from it, " alice" say).
        serializer = self.get_serializer(data=request.data)
        try:
            serializer.is_valid(raise_exception=True)
        except TokenError as error:
            raise InvalidToken(error.args[0]) from error
        except serializers.SecondFactorRefused:
            # Audited here, beside the success row, not as a side effect of validation.
            audit.security_event(
                event=audit.Event.LOGIN_FAILED,
                target=serializer.user,
                ip=client_ip_from_request(request),
                reason="bad second factor",
                details={"username": serializer.user.username, "method": "jwt"},
            )
            raise
        audit.security_event(
            event=audit.Event.LOGIN_SUCCEEDED,
            actor=serializer.user,
            target=serializer.user,
            ip=client_ip_from_request(request),
            details={"method": "jwt", "second_factor": serializer.second_factor_passed},
        )
        return Response(serializer.validated_data, status=status.HTTP_200_OK, headers=NO_STORE)


class RefreshView(jwt_views.TokenRefreshView):
    """Exchange a refresh token for a new access and a new refresh token (the old one dies)."""

    def post(self, request, *args, **kwargs):
        response = super().post(request, *args, **kwargs)
        for name, value in NO_STORE.items():
            response[name] = value
        return response


class LogoutView(APIView):
    """Blacklist a refresh token and close the sockets its login opened."""

    permission_classes = [AllowAny]
    authentication_classes = []

    def get_authenticate_header(self, request):
        # Without a challenge DRF turns an invalid token's 401 into a 403.
        return 'Bearer realm="api"'

    @extend_schema(
        request=serializers.LogoutSerializer,
        responses={
            200: OpenApiResponse(description="Logged out"),
            401: serializers.ErrorSerializer,
        },
    )
    def post(self, request):
        data = serializers.LogoutSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            chat_services.jwt_logout(
                token=data.validated_data["refresh"], ip=client_ip_from_request(request)
            )
        except TokenError as error:
            raise InvalidToken(str(error)) from error
        return Response({"detail": "logged out"})


class TicketCreateView(APIView):
    """Issue a single-use ticket to open one WebSocket to one room, from this IP, within seconds."""

    permission_classes = [IsAuthenticated]
    throttle_classes = [TicketThrottle]

    @extend_schema(
        request=serializers.TicketRequestSerializer,
        responses={
            201: serializers.TicketSerializer,
            401: serializers.ErrorSerializer,
            403: serializers.ErrorSerializer,
            404: serializers.ErrorSerializer,
            429: serializers.ErrorSerializer,
        },
    )
    def post(self, request):
        slug = serializers.TicketRequestSerializer.room_of(request.data)
        user, ip = request.user, client_ip_from_request(request)
        room, membership = selectors.room_and_membership(slug=slug, user=user)
        if room is None:
            raise NotFound("no such room")
        if not permissions.can_view(user, room, membership):
            audit.security_event(
                event=audit.Event.TICKET_REFUSED,
                actor=user,
                target=user,
                room=room,
                ip=ip,
                reason="no access to the room",
            )
            raise PermissionDenied("you have no access to this room")
        if ip is None:
            raise ValidationError("cannot determine the client address")
        try:
            issued = services.ticket_issue(
                user=user,
                room=room,
                ip=ip,
                user_agent=request.headers.get("User-Agent", ""),
                credential=self._credential(request),
            )
        except services.TicketRefused as refused:
            raise PermissionDenied(refused.detail) from refused
        body = serializers.TicketSerializer.body(
            ticket=issued.token,
            expires_at=issued.row.expires_at,
            ws_url=f"/ws/rooms/{room.slug}/",
        )
        return Response(body, status=status.HTTP_201_CREATED, headers=NO_STORE)

    @staticmethod
    def _credential(request) -> str:
        token = request.auth
        if token is not None and token.get(FAMILY_CLAIM):
            return services.credential_for_jwt(token[FAMILY_CLAIM])
        if request.session.session_key:
            return services.credential_for_session(request.session.session_key)
        return ""
