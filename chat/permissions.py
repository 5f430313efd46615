"""The room policy, asked by the consumer, the REST API and the pages alike.

Every function is pure: it decides from the user, the room and the user's membership row (None when
the user has none), so a socket can check each action in memory with state kept fresh by events.
The user object also says how it signed in (accounts.second_factor): staff powers need a second
factor when CHAT_ADMIN_REQUIRE_OTP is on.
"""

from datetime import datetime

from django.conf import settings
from django.utils import timezone

from accounts import second_factor
from chat.models import Membership, Message, Room

Role = Membership.Role

# Higher outranks lower. Staff outrank every room role; a banned user has no standing.
_RANK = {None: 0, Role.MEMBER: 1, Role.MODERATOR: 2, Role.OWNER: 3}
_STAFF_RANK = 4


def _active(user) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active)


def _banned(membership: Membership | None) -> bool:
    return membership is not None and membership.banned_at is not None


def has_staff_powers(user) -> bool:
    """Staff see and moderate every room; with CHAT_ADMIN_REQUIRE_OTP only through a credential
    that passed a second factor, as the admin asks (accounts.second_factor). A staff account
    signed in with its password alone acts as the member it is."""
    if not user.is_staff:
        return False
    return not settings.CHAT_ADMIN_REQUIRE_OTP or second_factor.is_verified(user)


def is_demotion(old_role: str, new_role: str) -> bool:
    return _RANK[new_role] < _RANK[old_role]


def rank(user, membership: Membership | None) -> int:
    if not _active(user):
        return 0
    if has_staff_powers(user):
        return _STAFF_RANK
    if membership is None or _banned(membership):
        return 0
    return _RANK[membership.role]


def can_view(user, room: Room, membership: Membership | None) -> bool:
    if not _active(user) or room.archived_at is not None:
        return False
    if has_staff_powers(user):
        return True
    if _banned(membership):
        return False
    if room.visibility == Room.Visibility.PRIVATE:
        return membership is not None
    return True


def is_moderator(user, room: Room, membership: Membership | None) -> bool:
    return can_view(user, room, membership) and rank(user, membership) >= _RANK[Role.MODERATOR]


def can_post(user, room: Room, membership: Membership | None) -> bool:
    """May post at all; a mute is checked apart (is_muted) because it gets its own error."""
    if not can_view(user, room, membership):
        return False
    if room.visibility == Room.Visibility.READ_ONLY:
        return is_moderator(user, room, membership)
    return True


def is_muted(membership: Membership | None, now: datetime | None = None) -> bool:
    if membership is None or membership.muted_until is None:
        return False
    return membership.muted_until > (now or timezone.now())


def post_refusal(
    user, room: Room, membership: Membership | None, now: datetime | None = None
) -> tuple[str, str] | None:
    """Why `user` may not post (or type) in `room` now, as (error code, detail); None if they may.

    The one answer the socket (messages, typing) and the message store give.
    """
    if not can_post(user, room, membership):
        return "forbidden", "you may not post in this room"
    if is_muted(membership, now) and not has_staff_powers(user):
        return "muted", "you are muted in this room"
    return None


def can_delete(user, room: Room, membership: Membership | None, message: Message) -> bool:
    if not can_view(user, room, membership):
        return False
    if message.author_id is not None and message.author_id == user.pk:
        return True
    return is_moderator(user, room, membership)


def can_moderate(
    actor,
    room: Room,
    actor_membership: Membership | None,
    target,
    target_membership: Membership | None,
) -> bool:
    """May mute, kick, ban or change the role of `target`: moderators act only on lower ranks."""
    if not is_moderator(actor, room, actor_membership) or actor.pk == target.pk:
        return False
    return rank(actor, actor_membership) > _target_rank(target, target_membership)


def can_set_role(
    actor,
    room: Room,
    actor_membership: Membership | None,
    target,
    target_membership: Membership | None,
    role: str,
) -> bool:
    """May give `target` the role `role`: only a role below one's own, to someone below one."""
    if role not in Role.values:
        return False
    if not can_moderate(actor, room, actor_membership, target, target_membership):
        return False
    return _RANK[role] < rank(actor, actor_membership)


def can_add_member(actor, room: Room, actor_membership: Membership | None, role: str) -> bool:
    """May add a user to the room with `role` (needed to let anyone into a private room)."""
    return is_moderator(actor, room, actor_membership) and _RANK.get(role, 99) < rank(
        actor, actor_membership
    )


def can_join(user, room: Room, membership: Membership | None) -> bool:
    """May make oneself a member: public and read-only rooms, unless banned or already in."""
    return (
        membership is None
        and room.visibility != Room.Visibility.PRIVATE
        and can_view(user, room, membership)
    )


def can_manage_room(user, room: Room, membership: Membership | None) -> bool:
    """May change the room's title or visibility, or archive it."""
    return can_view(user, room, membership) and rank(user, membership) >= _RANK[Role.OWNER]


def can_create_room(user) -> bool:
    return _active(user)


def _target_rank(target, membership: Membership | None) -> int:
    # With the second factor required, staff rank belongs to a verified credential, not to the
    # account: as a target, a staff account is ranked by its membership, so a room's moderators
    # can mute or ban what its password alone reaches (a stolen one, say). Its verified
    # credentials pass over a ban (can_view) and a mute (post_refusal) as staff.
    if target.is_staff and not settings.CHAT_ADMIN_REQUIRE_OTP:
        return _STAFF_RANK
    if membership is None:
        return 0
    return _RANK[membership.role]
