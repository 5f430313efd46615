"""Token types: the WebSocket ticket, and refresh tokens whose family id survives rotation."""

import uuid
from datetime import timedelta

from django.conf import settings
from rest_framework_simplejwt.exceptions import ExpiredTokenError
from rest_framework_simplejwt.tokens import RefreshToken, Token
from rest_framework_simplejwt.utils import datetime_from_epoch

# Claim naming the login a token descends from; copied from refresh to access tokens and kept
# across rotation, so a logout can find every socket that login opened.
FAMILY_CLAIM = "sid"


def claimed_user_id(claim) -> int | None:
    """The user id a token's user-id claim names, or None: simplejwt and ticket_issue both write
    `str(user.pk)`, so a decimal string short enough to be a key and nothing else (a claim is
    signed, but a claim that names no key must be refused as a bad token, not fail a lookup)."""
    if isinstance(claim, str) and claim.isascii() and claim.isdigit() and len(claim) < 19:
        return int(claim)
    return None


class WebSocketTicket(Token):
    """A short-lived, single-use credential for one WebSocket connection to one room."""

    token_type = "ws_ticket"  # noqa: S105  (a claim value, not a password)

    @property
    def lifetime(self) -> timedelta:  # read at use, so settings overrides apply
        return settings.CHAT_TICKET_LIFETIME

    def check_exp(self, claim="exp", current_time=None) -> None:
        # No leeway, whatever SIMPLE_JWT["LEEWAY"] says: a ticket lives exactly its lifetime.
        now = current_time or self.current_time
        if datetime_from_epoch(self.payload[claim]) <= now:
            raise ExpiredTokenError("Ticket has expired")


class ChatRefreshToken(RefreshToken):
    """A refresh token that starts a login family (the `sid` claim)."""

    @classmethod
    def for_user(cls, user):
        token = super().for_user(user)
        token[FAMILY_CLAIM] = uuid.uuid4().hex
        return token
