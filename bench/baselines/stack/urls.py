"""The chat's URLs, and three views that answer a POST with a fixed body, a layer at a time."""

from django.http import JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_simplejwt.authentication import (
    JWTAuthentication,
    JWTStatelessUserAuthentication,
)

# What a ticket request's answer looks like (accounts/api.py), fixed.
BODY = {"ticket": "t" * 220, "expires_at": "2026-01-01T00:00:30Z", "ws_url": "/ws/rooms/room/"}


@csrf_exempt
def django_view(request):
    """Django alone: the chat's middleware and handler, a plain view."""
    return JsonResponse(BODY, status=201)


class DrfView(APIView):
    """DRF: request parsing, content negotiation, rendering; no authentication."""

    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = []

    def post(self, request):
        return Response(BODY, status=201)


class TokenView(DrfView):
    """DRF with simplejwt's stateless authentication: the token checked, no database."""

    authentication_classes = [JWTStatelessUserAuthentication]
    permission_classes = [IsAuthenticated]


class JwtView(TokenView):
    """DRF with simplejwt's own authentication: the token checked, its user read by the ORM."""

    authentication_classes = [JWTAuthentication]


urlpatterns = [
    path("bench/django/", django_view),
    path("bench/drf/", DrfView.as_view()),
    path("bench/token/", TokenView.as_view()),
    path("bench/jwt/", JwtView.as_view()),
    path("", include("chatproject.urls")),
]
