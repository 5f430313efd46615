"""Pages: the room list and a room. All data after the first paint comes from the API and socket."""

import math
import re
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render

from chat import permissions, selectors
from chat.models import SLUG_RE, Membership, Room
from chat.serializers import LIST_LIMIT


class SignInView(auth_views.LoginView):
    """Django's sign-in page; a signed-in visitor goes on to `next`, or to the rooms. A `next`
    naming this page itself goes to the rooms too: Django raised "Redirection loop" (a 500)
    for `/login/?next=/login/`, a link anyone could send."""

    redirect_authenticated_user = True

    def get_redirect_url(self):
        url = super().get_redirect_url()  # "" unless safe
        return "" if url and urlsplit(url).path == self.request.path else url


def _membership_from_annotations(room: Room) -> Membership | None:
    """The user's membership as rooms_visible annotated it (my_role, my_banned), never saved."""
    if room.my_role is None:
        return None
    return Membership(room=room, role=room.my_role, banned_at=room.my_banned)


# (value, name, description) from labels like "Private: members only".
_VISIBILITY_CHOICES = [(value, *label.split(": ", 1)) for value, label in Room.Visibility.choices]


@login_required
def room_list(request):
    """The rooms, a page of LIST_LIMIT at a time (`?after=<slug>`), as the API gives them."""
    after = request.GET.get("after")
    if after is not None and not re.fullmatch(SLUG_RE, after):
        after = None  # a link edited by hand: the first page
    rooms, next_after = selectors.rooms_visible_page(
        user=request.user, after=after, limit=LIST_LIMIT
    )
    for room in rooms:
        room.can_join = permissions.can_join(request.user, room, _membership_from_annotations(room))
    return render(
        request,
        "chat/room_list.html",
        {
            "rooms": rooms,
            "page_after": after or "",
            "next_after": next_after,
            "visibilities": _VISIBILITY_CHOICES,
            "unread_refresh_ms": _unread_refresh_ms(settings.CHAT_UNREAD_REFRESH_SECONDS),
        },
    )


def _unread_refresh_ms(seconds: float) -> int:
    """The room list's refresh period: 0 (off) for 0 or a nonsense value, else at least 1 s."""
    if not math.isfinite(seconds) or seconds <= 0:
        return 0
    return max(1000, round(seconds * 1000))


@login_required
def room_page(request, slug: str):
    room, membership = selectors.room_and_membership(slug=slug, user=request.user)
    if room is None:
        raise Http404("no such room")
    can_view = permissions.can_view(request.user, room, membership)
    return render(
        request,
        "chat/room.html",
        {
            "room": room,
            "can_view": can_view,
            "can_join": permissions.can_join(request.user, room, membership),
            # What hello will say, so that the composer is right before the socket is open.
            "can_post": can_view and permissions.can_post(request.user, room, membership),
            "muted_until": membership.muted_until if membership else None,
            "max_length": settings.CHAT_MAX_MESSAGE_LENGTH,
        },
        status=200 if can_view else 403,
    )
