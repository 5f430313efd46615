"""Rooms REST API: thin views over chat.selectors and chat.services, same policy as the sockets."""

from operator import attrgetter

from django.db import transaction
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import APIException, NotFound, PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.ip import client_ip_from_request
from accounts.serializers import ErrorSerializer
from accounts.throttling import ApiThrottle, FirstRefusal, MessagePostThrottle, RoomCreateThrottle
from chat import permissions, selectors, serializers, services
from chat.models import Room
from chatproject.rest import link_next


class ConflictError(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class InvalidRequest(APIException):
    """A 400 carrying the service's error code (too_long, invalid_frame...) as `code`."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid"


def _raise_for(error: services.ServiceError):
    if isinstance(error, services.Forbidden):
        raise PermissionDenied(error.detail, code=error.code) from error
    if isinstance(error, services.NotFound):
        raise NotFound(error.detail, code=error.code) from error
    if isinstance(error, services.Conflict):
        raise ConflictError(error.detail, code=error.code) from error
    raise InvalidRequest(error.detail, code=error.code) from error


_ERRORS = {403: ErrorSerializer, 404: ErrorSerializer}

# The query and the response header of a list that comes in pages (rooms, members).
_LIST_PAGE = [
    OpenApiParameter(
        "after",
        str,
        description="Start after this key (slug, username): the last of the page before",
    ),
    OpenApiParameter(
        "limit", int, description=f"At most this many (<= {serializers.LIST_LIMIT_MAX})"
    ),
    OpenApiParameter(
        "Link",
        str,
        location=OpenApiParameter.HEADER,
        response=[200],
        description='The next page, `<path?after=...>; rel="next"`; absent on the last page',
    ),
]


def _page_query(
    request, serializer_class=serializers.ListQuerySerializer
) -> tuple[str | None, int, dict]:
    """`after` and `limit` of a list page, and all the query's values (a list's own filters),
    or a 400 naming the bad one."""
    query = serializer_class(data=request.query_params)
    query.is_valid(raise_exception=True)
    return query.validated_data.get("after"), query.validated_data["limit"], query.validated_data


class RoomScopedView(APIView):
    """Resolves <slug> to a room the user may view: 404 if unknown or archived, 403 if no access."""

    def room_for(self, request, slug: str) -> Room:
        room, self.membership = selectors.room_and_membership(slug=slug, user=request.user)
        if room is None:
            raise NotFound("no such room")
        if not permissions.can_view(request.user, room, self.membership):
            raise PermissionDenied("you have no access to this room")
        return room


class RoomListView(FirstRefusal, APIView):
    throttle_classes = [ApiThrottle, RoomCreateThrottle]

    @extend_schema(parameters=_LIST_PAGE, responses={200: serializers.RoomSerializer(many=True)})
    def get(self, request):
        """Rooms you can see, with your role and your unread count, by slug, in pages."""
        after, limit, _ = _page_query(request)
        rooms, next_after = selectors.rooms_visible_page(
            user=request.user, after=after, limit=limit
        )
        return Response(
            serializers.RoomSerializer(rooms, many=True).data,
            headers=link_next(request, after=next_after),
        )

    @extend_schema(
        request=serializers.RoomCreateSerializer,
        responses={201: serializers.RoomSerializer, 409: ErrorSerializer},
    )
    def post(self, request):
        """Create a room; you become its owner."""
        data = serializers.RoomCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            room = services.room_create(actor=request.user, **data.validated_data)
        except services.ServiceError as error:
            _raise_for(error)
        room.my_role, room.unread = "owner", 0
        return Response(serializers.RoomSerializer(room).data, status=status.HTTP_201_CREATED)


class RoomDetailView(RoomScopedView):
    @extend_schema(responses={200: serializers.RoomSerializer, **_ERRORS})
    def get(self, request, slug: str):
        room = self.room_for(request, slug)
        room.my_role = self.membership.role if self.membership else None
        return Response(serializers.RoomSerializer(room).data)

    @extend_schema(
        request=serializers.RoomUpdateSerializer,
        responses={200: serializers.RoomSerializer, **_ERRORS},
    )
    def patch(self, request, slug: str):
        """Change the title or visibility (owners and staff)."""
        room = self.room_for(request, slug)
        data = serializers.RoomUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            room = services.room_update(actor=request.user, room=room, **data.validated_data)
        except services.ServiceError as error:
            _raise_for(error)
        room.my_role = self.membership.role if self.membership else None
        return Response(serializers.RoomSerializer(room).data)


class RoomArchiveView(RoomScopedView):
    @extend_schema(
        request=serializers.ArchiveSerializer,
        responses={200: serializers.RoomSerializer, **_ERRORS},
    )
    def post(self, request, slug: str):
        """Archive the room (owners and staff): its open sockets close with 4404."""
        room = self.room_for(request, slug)
        data = serializers.ArchiveSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            room = services.room_archive(
                actor=request.user, room=room, reason=data.validated_data["reason"]
            )
        except services.ServiceError as error:
            _raise_for(error)
        return Response(serializers.RoomSerializer(room).data)


class RoomJoinView(APIView):
    @extend_schema(request=None, responses={200: serializers.MemberSerializer, **_ERRORS})
    def post(self, request, slug: str):
        """Become a member of a public or read-only room."""
        room = selectors.room_get(slug=slug)
        if room is None:
            raise NotFound("no such room")
        try:
            membership = services.room_join(user=request.user, room=room)
        except services.ServiceError as error:
            _raise_for(error)
        return Response(serializers.MemberSerializer(membership).data)


class RoomReadView(RoomScopedView):
    @extend_schema(request=serializers.ReadSerializer, responses={204: None, **_ERRORS})
    def post(self, request, slug: str):
        """Mark messages up to `seq` as read (for unread counts)."""
        room = self.room_for(request, slug)
        data = serializers.ReadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.room_mark_read(user=request.user, room=room, seq=data.validated_data["seq"])
        return Response(status=status.HTTP_204_NO_CONTENT)


class MessageListView(FirstRefusal, RoomScopedView):
    throttle_classes = [ApiThrottle, MessagePostThrottle]

    @extend_schema(
        parameters=[
            OpenApiParameter("before", int, description="Messages with seq below this"),
            OpenApiParameter("after", int, description="Messages with seq above this"),
            OpenApiParameter("limit", int, description="At most this many (<= 100)"),
        ],
        responses={200: serializers.MessagePageSerializer, **_ERRORS},
    )
    def get(self, request, slug: str):
        """A page of messages, oldest first: the newest ones, or those before/after a seq."""
        room = self.room_for(request, slug)
        query = serializers.MessageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        page, has_more = selectors.messages_page(room=room, **query.validated_data)
        return Response(
            {"messages": selectors.message_payloads(page, room=room), "has_more": has_more}
        )

    @extend_schema(
        request=serializers.MessageCreateSerializer,
        responses={
            201: serializers.MessageAckSerializer,
            200: serializers.MessageAckSerializer,
            **_ERRORS,
        },
    )
    def post(self, request, slug: str):
        """Post a message (sockets are the usual way); a repeated client_id acks the stored one."""
        room = self.room_for(request, slug)
        data = serializers.MessageCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            body = services.clean_body(data.validated_data["body"])
            client_id = services.clean_client_id(data.validated_data["client_id"])
        except services.ServiceError as error:
            _raise_for(error)
        result = services.message_send(
            room=room,
            author=request.user,
            body=body,
            client_id=client_id,
            ip=client_ip_from_request(request),
        )
        if result.error:
            if result.error in ("forbidden", "muted"):
                raise PermissionDenied(result.detail, code=result.error)
            if result.error == "not_found":
                raise NotFound(result.detail)
            raise InvalidRequest(result.detail, code=result.error)
        return Response(
            {"seq": result.seq, "client_id": client_id, "duplicate": result.duplicate},
            status=status.HTTP_200_OK if result.duplicate else status.HTTP_201_CREATED,
        )


class MessageDetailView(RoomScopedView):
    @extend_schema(responses={204: None, **_ERRORS})
    def delete(self, request, slug: str, seq: int):
        """Delete a message (its author, moderators, staff); it stays as a tombstone."""
        room = self.room_for(request, slug)
        try:
            services.message_delete(
                actor=request.user, room=room, seq=seq, ip=client_ip_from_request(request)
            )
        except services.ServiceError as error:
            _raise_for(error)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MemberListView(RoomScopedView):
    @extend_schema(
        parameters=[
            *_LIST_PAGE,
            OpenApiParameter(
                "username",
                str,
                many=True,
                explode=True,
                description="Only these users' memberships (repeat it, at most "
                f"{serializers.LIST_LIMIT_MAX}): those of them who are members",
            ),
            OpenApiParameter(
                "q",
                str,
                description=(
                    "Only members whose username starts with this, in any case; blank: all"
                ),
            ),
        ],
        responses={200: serializers.MemberSerializer(many=True), **_ERRORS},
    )
    def get(self, request, slug: str):
        """The room's members by username, in pages; or those among the given usernames, or
        whose username starts with `q`. Bans and mutes are moderation data: moderators only see
        them (and banned members)."""
        room = self.room_for(request, slug)
        after, limit, query = _page_query(request, serializers.MemberQuerySerializer)
        moderator = permissions.is_moderator(request.user, room, self.membership)
        members, next_after = selectors.page_after(
            selectors.room_members(
                room=room,
                include_banned=moderator,
                after=after,
                usernames=query.get("username"),
                starting=query.get("q") or None,
            ),
            limit=limit,
            key=attrgetter("user.username"),
        )
        serializer_class = (
            serializers.MemberSerializer if moderator else serializers.PublicMemberSerializer
        )
        return Response(
            serializer_class(members, many=True).data, headers=link_next(request, after=next_after)
        )

    @extend_schema(
        request=serializers.MemberAddSerializer,
        responses={201: serializers.MemberSerializer, **_ERRORS},
    )
    def post(self, request, slug: str):
        """Add a user to the room (moderators add members, owners also moderators)."""
        room = self.room_for(request, slug)
        data = serializers.MemberAddSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        if not permissions.is_moderator(request.user, room, self.membership):
            # Before looking the user up: who has an account is not every visitor's business.
            raise PermissionDenied("only moderators add members")
        user = selectors.user_get(username=data.validated_data["username"])
        if user is None:
            raise NotFound("no such user")
        try:
            membership = services.membership_add(
                actor=request.user, room=room, user=user, role=data.validated_data["role"]
            )
        except services.ServiceError as error:
            _raise_for(error)
        return Response(
            serializers.MemberSerializer(membership).data, status=status.HTTP_201_CREATED
        )


class MemberDetailView(RoomScopedView):
    def _target(self, request, slug: str, username: str):
        room = self.room_for(request, slug)
        # Only moderators act on others: answer everyone else before looking anything up, so
        # the answer never tells who exists, who is a member or who is banned.
        if username != request.user.get_username() and not permissions.is_moderator(
            request.user, room, self.membership
        ):
            raise PermissionDenied("you may not change other members")
        user = selectors.user_get(username=username)
        if user is None:
            raise NotFound("no such user")
        return room, user

    @extend_schema(
        request=serializers.MemberUpdateSerializer,
        responses={
            200: serializers.MemberSerializer,
            204: OpenApiResponse(
                description="No membership is left: the lifted ban was of someone who had "
                "never joined the room"
            ),
            **_ERRORS,
        },
    )
    def patch(self, request, slug: str, username: str):
        """Change a member's role, mute (muted_until; null unmutes) or ban (banned, reason)."""
        room, user = self._target(request, slug, username)
        data = serializers.MemberUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        changes, reason = data.validated_data, data.validated_data.get("reason", "")
        if not {"role", "muted_until", "banned"} & changes.keys():
            raise ValidationError({"detail": "nothing to change: give role, muted_until or banned"})
        actor = request.user
        try:
            # All or nothing: a refused part must not leave the others applied (broadcasts
            # wait for the commit).
            with transaction.atomic():
                membership = self._apply(actor, room, user, changes, reason)
        except services.ServiceError as error:
            _raise_for(error)
        if membership is None:  # no membership left (chat.services.member_unban)
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(serializers.MemberSerializer(membership).data)

    @staticmethod
    def _apply(actor, room, user, changes, reason):
        membership = None
        if "banned" in changes:
            action = services.member_ban if changes["banned"] else services.member_unban
            kwargs = {"reason": reason} if changes["banned"] else {}
            membership = action(actor=actor, room=room, user=user, **kwargs)
        if "muted_until" in changes:
            membership = services.member_mute(
                actor=actor, room=room, user=user, until=changes["muted_until"], reason=reason
            )
        if "role" in changes:
            membership = services.membership_set_role(
                actor=actor, room=room, user=user, role=changes["role"]
            )
        return membership

    @extend_schema(responses={204: None, **_ERRORS})
    def delete(self, request, slug: str, username: str):
        """Remove (kick) a member, or leave (your own name); their sockets in the room close 4403.

        A ban stays (400: lift it instead); a banned or muted member cannot leave (403); a muted
        member is not removed (400: ban them, or lift the mute first).
        """
        room, user = self._target(request, slug, username)
        try:
            services.member_remove(actor=request.user, room=room, user=user)
        except services.ServiceError as error:
            _raise_for(error)
        return Response(status=status.HTTP_204_NO_CONTENT)
