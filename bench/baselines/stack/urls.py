"""The chat's URLs, and views that answer a POST with a fixed body, a layer at a time."""

import json

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

from accounts.authentication import ChatJWTAuthentication
from bench.baselines.raw_asgi import ANSWER


@csrf_exempt
def django_view(request):
    """Django alone: the chat's middleware and handler, a plain view that reads the JSON body."""
    json.loads(request.body)
    return JsonResponse(ANSWER, status=201)


class DrfView(APIView):
    """DRF: the body parsed, content negotiated, the answer rendered; no authentication."""

    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = []

    def post(self, request):
        request.data.get("room")
        return Response(ANSWER, status=201)


class TokenView(DrfView):
    """DRF with simplejwt's stateless authentication: the token checked, no database."""

    authentication_classes = [JWTStatelessUserAuthentication]
    permission_classes = [IsAuthenticated]


class JwtView(TokenView):
    """DRF with simplejwt's own authentication: the token checked, its user read by the ORM."""

    authentication_classes = [JWTAuthentication]


class ChatAuthView(TokenView):
    """DRF with the chat's authentication (the ticket view's): the token checked, its user and
    its login's end read in one statement."""

    authentication_classes = [ChatJWTAuthentication]


urlpatterns = [
    path("bench/django/", django_view),
    path("bench/drf/", DrfView.as_view()),
    path("bench/token/", TokenView.as_view()),
    path("bench/jwt/", JwtView.as_view()),
    path("bench/chat-auth/", ChatAuthView.as_view()),
    path("", include("chatproject.urls")),
]
