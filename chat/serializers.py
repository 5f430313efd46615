"""Request and response shapes of the rooms API."""

import re

from django.conf import settings
from rest_framework import serializers

from chat.models import MAX_SEQ, SLUG_RE, Membership, Room
from chatproject.rest import StringField, StringRegexField

# Control characters and bidi overrides/isolates: names and reasons shown to others are one
# line of text that reads as it is stored ("Trojan Source" reordering included).
# Lists (rooms, members) come in pages of this many, up to LIST_LIMIT_MAX on request; the
# response's Link header names the next page (docs/protocol.md).
LIST_LIMIT = 100
LIST_LIMIT_MAX = 500

_NOT_PLAIN = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class PlainTextField(StringField):
    default_error_messages = {"not_plain": "Use plain text: no control or bidi characters."}

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if _NOT_PLAIN.search(value):
            self.fail("not_plain")
        return value


class RoomSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField()
    unread = serializers.SerializerMethodField()

    class Meta:
        model = Room
        fields = [
            "slug",
            "title",
            "visibility",
            "created_at",
            "archived_at",
            "last_seq",
            "role",
            "unread",
        ]
        read_only_fields = ["created_at", "archived_at", "last_seq"]

    def get_role(self, room) -> str | None:
        return getattr(room, "my_role", None)

    def get_unread(self, room) -> int | None:
        return getattr(room, "unread", None)


class RoomCreateSerializer(serializers.Serializer):
    slug = StringRegexField(SLUG_RE, max_length=50)
    title = PlainTextField(max_length=120)
    visibility = serializers.ChoiceField(Room.Visibility.choices, default=Room.Visibility.PUBLIC)


class RoomUpdateSerializer(serializers.Serializer):
    title = PlainTextField(max_length=120, required=False)
    visibility = serializers.ChoiceField(Room.Visibility.choices, required=False)


class ArchiveSerializer(serializers.Serializer):
    reason = PlainTextField(max_length=200, required=False, default="", allow_blank=True)


class ReadSerializer(serializers.Serializer):
    seq = serializers.IntegerField(min_value=0, max_value=MAX_SEQ)


class MessageQuerySerializer(serializers.Serializer):
    before = serializers.IntegerField(min_value=0, max_value=MAX_SEQ, required=False)
    after = serializers.IntegerField(min_value=0, max_value=MAX_SEQ, required=False)
    limit = serializers.IntegerField(min_value=1, default=50)

    def validate_limit(self, value):
        if value > settings.CHAT_HISTORY_LIMIT:
            raise serializers.ValidationError(f"at most {settings.CHAT_HISTORY_LIMIT}")
        return value

    def validate(self, attrs):
        if "before" in attrs and "after" in attrs:
            raise serializers.ValidationError("give before or after, not both")
        return attrs


class ListQuerySerializer(serializers.Serializer):
    """A page of a list by key: the rooms (by slug) or a room's members (by username)."""

    after = serializers.CharField(max_length=150, required=False, trim_whitespace=False)
    limit = serializers.IntegerField(min_value=1, max_value=LIST_LIMIT_MAX, default=LIST_LIMIT)


class MemberQuerySerializer(ListQuerySerializer):
    """A page of a room's members, or of those among the given usernames (`username`, repeated):
    what a page asks about the users its room's presence shows, without every page of a large
    room."""

    username = serializers.ListField(
        child=serializers.CharField(max_length=150, trim_whitespace=False),
        required=False,
        allow_empty=False,
        max_length=LIST_LIMIT_MAX,
    )
    # A username's start, any case. Blank (or only spaces) is no filter, as a search box that was
    # cleared would send it.
    q = serializers.CharField(max_length=150, required=False, allow_blank=True)


class MessageSerializer(serializers.Serializer):
    """A message, or a tombstone (deleted: true, no body) if it was deleted."""

    seq = serializers.IntegerField()
    room = serializers.CharField()
    author = serializers.CharField(allow_null=True)
    created_at = serializers.CharField()
    body = serializers.CharField(required=False)
    client_id = serializers.CharField(required=False)
    deleted = serializers.BooleanField(required=False)


class MessagePageSerializer(serializers.Serializer):
    messages = MessageSerializer(many=True)
    has_more = serializers.BooleanField()


class MessageCreateSerializer(serializers.Serializer):
    body = StringField(trim_whitespace=False, max_length=100_000)
    client_id = StringField(max_length=64)


class MessageAckSerializer(serializers.Serializer):
    seq = serializers.IntegerField()
    client_id = serializers.CharField()
    duplicate = serializers.BooleanField()


class MemberSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username")
    banned = serializers.SerializerMethodField()

    class Meta:
        model = Membership
        fields = [
            "username",
            "role",
            "joined_at",
            "muted_until",
            "banned",
            "banned_at",
            "ban_reason",
        ]

    def get_banned(self, membership) -> bool:
        return membership.banned_at is not None


class PublicMemberSerializer(serializers.ModelSerializer):
    """A member as other members see them: no moderation data."""

    username = serializers.CharField(source="user.username")

    class Meta:
        model = Membership
        fields = ["username", "role", "joined_at"]


class MemberAddSerializer(serializers.Serializer):
    username = StringField(max_length=150)
    role = serializers.ChoiceField(Membership.Role.choices, default=Membership.Role.MEMBER)


class MemberUpdateSerializer(serializers.Serializer):
    role = serializers.ChoiceField(Membership.Role.choices, required=False)
    muted_until = serializers.DateTimeField(required=False, allow_null=True)
    banned = serializers.BooleanField(required=False)
    reason = PlainTextField(max_length=200, required=False, default="", allow_blank=True)
