"""The admin: read-only audit trail with CSV export, security overview, moderation via services."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime

from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.core.paginator import EmptyPage, PageNotAnInteger, Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.http import urlencode

from accounts.ip import client_ip_from_request
from accounts.models import Ticket
from chat import audit, selectors, services
from chat.models import (
    AuditCheckpoint,
    ConnectionLog,
    Membership,
    Message,
    MessageLog,
    Room,
    SecurityEvent,
)
from chatproject.dbthread import database_thread

# --- CSV export ----------------------------------------------------------------------------------

# A cell starting with one of these is a formula to a spreadsheet; audit rows hold text chosen by
# clients (User-Agent, Origin, usernames), which must never run on an analyst's machine.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


class _Echo:
    """A write-only file whose write() returns the line, so csv.writer can feed a stream."""

    def write(self, value: str) -> str:
        return value


def csv_lines(queryset: QuerySet, fields: Iterable[str]) -> Iterator[str]:
    """The header, then one line per row, read from the database in chunks."""
    fields = list(fields)
    # Every cell quoted: a spreadsheet whose list separator is ";" (or tab) would otherwise
    # split `Mozilla/5.0;=cmd|...` at the ";" and start a cell with a formula.
    writer = csv.writer(_Echo(), quoting=csv.QUOTE_ALL)
    yield writer.writerow(fields)
    for row in queryset.values_list(*fields).iterator(chunk_size=2000):
        yield writer.writerow([_csv_cell(v) for v in row])


async def _in_request_thread(lines: Iterator[str], size: int = 500) -> AsyncIterator[str]:
    # Under ASGI a synchronous iterator would be read to the end into memory before the first byte
    # goes out; read it chunk by chunk in the request's database thread instead.
    def take():
        return list(itertools.islice(lines, size))

    while chunk := await database_thread.run(take):
        for line in chunk:
            yield line


def csv_response(request: HttpRequest, queryset: QuerySet, fields, name: str):
    # Who took a copy of the trail, and how much of it, is part of the trail.
    audit.security_event(
        event=audit.Event.AUDIT_EXPORTED,
        actor=request.user,
        ip=client_ip_from_request(request),
        details={"rows_of": name, "rows": queryset.count()},
    )
    lines = csv_lines(queryset, fields)
    content = _in_request_thread(lines) if isinstance(request, ASGIRequest) else lines
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="{name}-{stamp}.csv"'
    return response


def _changelist_link(model, text: str, **filters) -> str:
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    return format_html('<a href="{}?{}">{}</a>', url, urlencode(filters), text)


class DateHierarchyChangeList(ChangeList):
    """Django's list, with a date hierarchy link edited past year 9999 taken as a bad filter
    (the list's error page) rather than a 500: Django checks the first day of the range, not
    the day after its last, nor a month or day too large to convert."""

    def get_filters(self, request):
        try:
            return super().get_filters(request)
        except (ValueError, OverflowError) as exc:
            raise IncorrectLookupParameters(exc) from exc


class DateHierarchyMixin:
    """For the admins with a date_hierarchy."""

    def get_changelist(self, request, **kwargs):
        return DateHierarchyChangeList


class ReadOnlyMixin:
    """No add, change or delete, for superusers too: the rows change only through the services.

    Django then answers a POST to the add, change or delete page with 403, drops the bulk delete
    action, and shows the change page as a read-only detail page (to the view permission).
    """

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# --- the audit trail -----------------------------------------------------------------------------


class EstimatedCountPaginator(Paginator):
    """On PostgreSQL, the size of a large table's unfiltered list is the planner's estimate
    (`pg_class.reltuples`, kept by autovacuum's ANALYZE): COUNT(*) reads the whole table, every
    page, which on millions of audit rows takes seconds. A filtered list, a small table, a table
    never analyzed, and SQLite get the exact count."""

    exact_below = 100_000
    estimated = False

    @cached_property
    def count(self) -> int:
        rows = self.object_list
        connection = connections[rows.db]
        if connection.vendor == "postgresql" and not rows.query.where:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                    [connection.ops.quote_name(rows.model._meta.db_table)],
                )
                found = cursor.fetchone()
            if found is not None and found[0] >= self.exact_below:
                self.estimated = True
                return found[0]
        return super().count

    # An estimate can fall short (rows added since the last ANALYZE): a page past it is served
    # all the same, as full as the rows allow, rather than refused as out of range.
    def validate_number(self, number):
        if not (self.count and self.estimated):
            return super().validate_number(number)
        try:
            number = int(number)
        except (TypeError, ValueError):
            raise PageNotAnInteger("That page number is not an integer") from None
        if number < 1:
            raise EmptyPage("That page number is less than 1")
        return number

    def page(self, number):
        if not (self.count and self.estimated):
            return super().page(number)
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        return self._get_page(self.object_list[bottom : bottom + self.per_page], number, self)


class AuditAdmin(DateHierarchyMixin, ReadOnlyMixin, admin.ModelAdmin):
    """The audit trail: read-only, as chat.audit is its only writer. Needs the view permission."""

    csv_fields: tuple[str, ...] = ()
    actions = ["export_csv"]
    # Counting a large audit table on every page costs more than the number is worth: no second
    # count of the unfiltered table, and an estimate for it when it is the list (PostgreSQL).
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 100

    @admin.action(description="Export selected rows as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        return csv_response(request, queryset, self.csv_fields, self.model._meta.model_name)


CHAIN_FIELDSET = ("Chain", {"fields": ("chain_seq", "prev_hash", "row_hash")})


@admin.register(ConnectionLog)
class ConnectionLogAdmin(AuditAdmin):
    list_display = (
        "opened_at",
        "outcome",
        "reason",
        "username",
        "room_slug",
        "ip",
        "transport",
        "closed_at",
        "close_code",
        "chain_seq",
    )
    list_filter = ("outcome", "reason", "transport", "room", "opened_at")
    search_fields = ("username", "=ip", "=jti", "room_slug")
    search_help_text = "Username, room slug, or an exact IP or ticket id (jti)."
    date_hierarchy = "opened_at"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "outcome",
                    "reason",
                    "opened_at",
                    "user",
                    "username",
                    "room",
                    "room_slug",
                )
            },
        ),
        (
            "Client",
            {"fields": ("ip", "origin", "user_agent", "transport", "jti", "ticket", "instance")},
        ),
        (
            "Close",
            {
                "fields": (
                    "closed_at",
                    "close_code",
                    "messages_received",
                    "messages_sent",
                    "message_events",
                )
            },
        ),
        (
            "Chain",
            {
                "fields": (
                    "chain_seq",
                    "prev_hash",
                    "row_hash",
                    "close_chain_seq",
                    "close_prev_hash",
                    "close_hash",
                )
            },
        ),
    )
    csv_fields = (
        "chain_seq",
        "id",
        "opened_at",
        "outcome",
        "reason",
        "username",
        "user_id",
        "room_slug",
        "room_id",
        "ip",
        "origin",
        "user_agent",
        "transport",
        "jti",
        "instance",
        "closed_at",
        "close_code",
        "messages_received",
        "messages_sent",
        "close_chain_seq",
        "prev_hash",
        "row_hash",
        "close_prev_hash",
        "close_hash",
    )

    @admin.display(description="message events")
    def message_events(self, obj: ConnectionLog) -> str:
        return _changelist_link(MessageLog, "Message events of this connection", connection=obj.pk)

    @admin.display(description="ticket")
    def ticket(self, obj: ConnectionLog) -> str:
        if not obj.jti:
            return "-"
        return _changelist_link(Ticket, obj.jti, jti=obj.jti)

    # The security overview lives under this admin's URLs: /admin/chat/connectionlog/overview/.

    def get_urls(self):
        overview = path(
            "overview/",
            self.admin_site.admin_view(self.security_overview_view),
            name="chat_security_overview",
        )
        return [overview, *super().get_urls()]

    def has_security_overview_permission(self, request) -> bool:
        return self.has_view_permission(request) and request.user.has_perm(
            "chat.view_securityevent"
        )

    def security_overview_view(self, request):
        if not self.has_security_overview_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": "Security overview",
            "opts": self.model._meta,
            "overview": selectors.security_overview(),
        }
        return TemplateResponse(request, "admin/chat/security_overview.html", context)


@admin.register(MessageLog)
class MessageLogAdmin(AuditAdmin):
    list_display = (
        "created_at",
        "event",
        "reason",
        "username",
        "room_slug",
        "seq",
        "ip",
        "chain_seq",
    )
    list_filter = ("event", "reason", "room", "created_at")
    search_fields = ("username", "=ip", "room_slug")
    search_help_text = "Username, room slug, or an exact IP."
    date_hierarchy = "created_at"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "event",
                    "reason",
                    "created_at",
                    "user",
                    "username",
                    "room",
                    "room_slug",
                    "seq",
                    "ip",
                    "connection_link",
                )
            },
        ),
        CHAIN_FIELDSET,
    )
    csv_fields = (
        "chain_seq",
        "created_at",
        "event",
        "reason",
        "username",
        "user_id",
        "room_slug",
        "room_id",
        "seq",
        "connection_id",
        "ip",
        "prev_hash",
        "row_hash",
    )

    @admin.display(description="connection")
    def connection_link(self, obj: MessageLog) -> str:
        if obj.connection_id is None:
            return "-"
        url = reverse("admin:chat_connectionlog_change", args=[obj.connection_id])
        return format_html('<a href="{}">{}</a>', url, obj.connection_id)


@admin.register(SecurityEvent)
class SecurityEventAdmin(AuditAdmin):
    list_display = (
        "created_at",
        "event",
        "actor_name",
        "target_name",
        "room_slug",
        "ip",
        "reason",
        "chain_seq",
    )
    list_filter = ("event", "room", "created_at")
    search_fields = ("actor_name", "target_name", "=ip", "=details__jti", "room_slug")
    search_help_text = "Actor or target username, room slug, or an exact IP or ticket id (jti)."
    date_hierarchy = "created_at"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "event",
                    "created_at",
                    "actor",
                    "actor_name",
                    "target",
                    "target_name",
                    "room",
                    "room_slug",
                    "ip",
                    "reason",
                    "details",
                )
            },
        ),
        CHAIN_FIELDSET,
    )
    csv_fields = (
        "chain_seq",
        "created_at",
        "event",
        "actor_name",
        "actor_id",
        "target_name",
        "target_id",
        "room_slug",
        "room_id",
        "ip",
        "reason",
        "details",
        "prev_hash",
        "row_hash",
    )


@admin.register(AuditCheckpoint)
class AuditCheckpointAdmin(AuditAdmin):
    list_display = ("seq", "created_at", "rows_pruned", "row_hash")
    list_filter = ("created_at",)
    date_hierarchy = "created_at"
    fields = ("seq", "row_hash", "created_at", "rows_pruned", "signature")
    csv_fields = fields


# --- rooms and messages: every change goes through chat.services --------------------------------


class MembershipInline(ReadOnlyMixin, admin.TabularInline):
    """Shown, not edited: roles, mutes and bans change in the app, where they are audited."""

    model = Membership
    fields = ("user", "role", "joined_at", "muted_until", "banned_at", "banned_by", "ban_reason")
    readonly_fields = fields
    extra = 0


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ("slug", "title", "visibility", "last_seq", "created_at", "archived_at")
    list_filter = ("visibility", ("archived_at", admin.EmptyFieldListFilter))
    search_fields = ("slug", "title")
    fields = ("slug", "title", "visibility", "created_by", "created_at", "archived_at", "last_seq")
    inlines = [MembershipInline]
    actions = ["archive"]

    def get_readonly_fields(self, request, obj=None):
        fixed = ("created_by", "created_at", "archived_at", "last_seq")
        return ("slug", *fixed) if obj is not None else fixed

    def has_change_permission(self, request, obj=None) -> bool:
        # An archived room is history: the services refuse to change it, so the form does too.
        archived = obj is not None and obj.is_archived
        return super().has_change_permission(request, obj) and not archived

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # deleting would erase the messages; archive instead

    def save_model(self, request, obj: Room, form, change: bool) -> None:
        if change:
            services.room_update(
                actor=request.user, room=obj, title=obj.title, visibility=obj.visibility
            )
            return
        room = services.room_create(
            actor=request.user, slug=obj.slug, title=obj.title, visibility=obj.visibility
        )
        # The admin carries on with `obj` (log entry, redirect): make it the stored room.
        obj.pk, obj.created_by, obj.created_at = room.pk, room.created_by, room.created_at
        obj._state.adding = False

    @admin.action(
        description="Archive selected rooms (closes their sockets)", permissions=["change"]
    )
    def archive(self, request, queryset):
        rooms = list(queryset.filter(archived_at__isnull=True))
        for room in rooms:
            services.room_archive(actor=request.user, room=room, reason="archived in the admin")
        self.message_user(request, f"Archived {len(rooms)} rooms.", messages.SUCCESS)


@admin.register(Message)
class MessageAdmin(DateHierarchyMixin, ReadOnlyMixin, admin.ModelAdmin):
    """Messages are read here and soft-deleted or restored through the services, never edited."""

    list_display = ("room", "seq", "author", "excerpt", "created_at", "deleted_at", "deleted_by")
    list_filter = ("room", "created_at", ("deleted_at", admin.EmptyFieldListFilter))
    search_fields = ("body", "author__username")
    search_help_text = "Message text or author username."
    date_hierarchy = "created_at"
    list_select_related = ("room", "author", "deleted_by")
    fields = (
        "room",
        "seq",
        "author",
        "body",
        "client_id",
        "created_at",
        "deleted_at",
        "deleted_by",
    )
    actions = ["soft_delete", "restore"]

    def has_moderate_permission(self, request) -> bool:
        return request.user.has_perm("chat.change_message")

    @admin.display(description="text")
    def excerpt(self, obj: Message) -> str:
        return obj.body if len(obj.body) <= 80 else obj.body[:79] + "…"

    @admin.action(
        description="Delete selected messages (audited and broadcast)", permissions=["moderate"]
    )
    def soft_delete(self, request, queryset):
        ip = client_ip_from_request(request)
        self._moderate(
            request,
            queryset.filter(deleted_at__isnull=True),
            lambda m: services.message_delete(actor=request.user, room=m.room, seq=m.seq, ip=ip),
            "Deleted",
        )

    @admin.action(
        description="Restore selected messages (audited and broadcast)", permissions=["moderate"]
    )
    def restore(self, request, queryset):
        self._moderate(
            request,
            queryset.filter(deleted_at__isnull=False),
            lambda m: services.message_restore(actor=request.user, message=m),
            "Restored",
        )

    def _moderate(self, request, queryset, act, verb: str) -> None:
        done, refused = 0, []
        for message in queryset.select_related("room"):
            try:
                act(message)
            except services.ServiceError as exc:
                refused.append(f"{message.room.slug}#{message.seq}: {exc.detail}")
            else:
                done += 1
        self.message_user(request, f"{verb} {done} messages.", messages.SUCCESS)
        if refused:
            self.message_user(request, "Refused: " + "; ".join(refused), messages.WARNING)
