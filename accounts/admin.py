"""The admin for users (deactivation through the service) and tickets (read-only, revocable)."""

from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin as DjangoGroupAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.models import Group
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django_otp.plugins.otp_static.admin import StaticDeviceAdmin
from django_otp.plugins.otp_static.models import StaticDevice
from django_otp.plugins.otp_totp.admin import TOTPDeviceAdmin
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework_simplejwt.token_blacklist import admin as blacklist_admin
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken

from accounts.models import Ticket, TicketQuerySet, User
from accounts.services import tickets_revoke
from chat import audit
from chat import services as chat_services
from chat.admin import DateHierarchyMixin, ReadOnlyMixin

# What decides what an account may do: only a superuser grants it (a staff user with
# "change user", a helpdesk say, could otherwise make themselves a superuser).
_PRIVILEGE_FIELDS = ("is_staff", "is_superuser", "groups", "user_permissions")


class ActingAsMixin:
    """The signal handlers in accounts/signals.py audit every change to a user, a group's
    permissions and a second-factor device; these tell them who made it."""

    def save_model(self, request, obj, form, change):
        with audit.acting_as(request.user):
            super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        # Groups and permissions (many-to-many) are saved here, after the row itself.
        with audit.acting_as(request.user):
            super().save_related(request, form, formsets, change)

    def delete_model(self, request, obj):
        with audit.acting_as(request.user):
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with audit.acting_as(request.user):
            super().delete_queryset(request, queryset)


class SuperuserChangesMixin:
    """What grants privileges is made, changed and deleted by superusers only."""

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser


@admin.register(User)
class UserAdmin(ActingAsMixin, DjangoUserAdmin):
    # is_active changes only through the actions: the services audit them and close sockets.
    readonly_fields = ("is_active", "last_login", "date_joined")
    actions = ["deactivate", "reactivate"]

    def get_queryset(self, request):
        # A superuser's account, its password above all, is only a superuser's to see and
        # change: the change, password, delete views and the actions all start from here.
        users = super().get_queryset(request)
        return users if request.user.is_superuser else users.exclude(is_superuser=True)

    def get_readonly_fields(self, request, obj=None):
        fields = super().get_readonly_fields(request, obj)
        return fields if request.user.is_superuser else (*fields, *_PRIVILEGE_FIELDS)

    def get_deleted_objects(self, objs, request):
        # A user's tickets go with the user, and none can be redeemed once the user is gone:
        # that the ticket admin is read-only must not make everyone who ever opened a socket
        # impossible to delete. Deleting the user (audited, accounts.signals) is the permission.
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        perms_needed.discard(Ticket._meta.verbose_name)
        return deleted, counts, perms_needed, protected

    def user_change_password(self, request, id, form_url=""):
        with audit.acting_as(request.user):
            return super().user_change_password(request, id, form_url)

    @admin.action(
        description="Deactivate selected users (closes their sockets)", permissions=["change"]
    )
    def deactivate(self, request, queryset):
        done = 0
        for user in queryset.filter(is_active=True).exclude(pk=request.user.pk):
            chat_services.user_deactivate(
                actor=request.user, user=user, reason="deactivated in the admin"
            )
            done += 1
        self.message_user(request, f"Deactivated {done} users.", messages.SUCCESS)
        if queryset.filter(pk=request.user.pk, is_active=True).exists():
            self.message_user(request, "You cannot deactivate yourself.", messages.WARNING)

    @admin.action(description="Reactivate selected users", permissions=["change"])
    def reactivate(self, request, queryset):
        done = 0
        for user in queryset.filter(is_active=False):
            chat_services.user_reactivate(actor=request.user, user=user)
            done += 1
        self.message_user(request, f"Reactivated {done} users.", messages.SUCCESS)


class TicketStateFilter(admin.SimpleListFilter):
    """The states of Ticket.state, as queries."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [
            ("issued", "Issued (still usable)"),
            ("used", "Used"),
            ("expired", "Expired unused"),
            ("revoked", "Revoked"),
        ]

    def queryset(self, request, queryset):
        if self.value() not in TicketQuerySet.state_conditions():
            return queryset
        return queryset.in_state(self.value())


@admin.register(Ticket)
class TicketAdmin(DateHierarchyMixin, ReadOnlyMixin, admin.ModelAdmin):
    """Tickets as issued and spent. The ticket string is never stored; its binding stays unshown."""

    list_display = (
        "jti",
        "user",
        "room",
        "state",
        "ip",
        "issued_at",
        "expires_at",
        "used_at",
        "revoked_at",
        "connections",
    )
    list_filter = (TicketStateFilter, "room", "issued_at")
    search_fields = ("=jti", "user__username", "=ip")
    search_help_text = "Username, or an exact ticket id (jti) or IP."
    date_hierarchy = "issued_at"
    list_select_related = ("user", "room")
    show_full_result_count = False
    fields = (
        "jti",
        "connections",
        "user",
        "room",
        "state",
        "ip",
        "user_agent",
        "issued_at",
        "expires_at",
        "used_at",
        "used_ip",
        "revoked_at",
    )
    actions = ["revoke"]

    def has_revoke_permission(self, request) -> bool:
        return request.user.has_perm("accounts.change_ticket")

    @admin.display(description="state")
    def state(self, obj: Ticket) -> str:
        return obj.state

    @admin.display(description="connection log")
    def connections(self, obj: Ticket) -> str:
        url = reverse("admin:chat_connectionlog_changelist")
        return format_html('<a href="{}?{}">Connections</a>', url, urlencode({"jti": obj.jti}))

    @admin.action(description="Revoke selected unused tickets (audited)", permissions=["revoke"])
    def revoke(self, request, queryset):
        # A plain queryset: the changelist's may carry ordering and joins that FOR UPDATE refuses.
        tickets = Ticket.objects.filter(pk__in=list(queryset.values_list("pk", flat=True)))
        count = tickets_revoke(actor=request.user, tickets=tickets)
        self.message_user(request, f"Revoked {count} tickets.", messages.SUCCESS)


# --- second factors -------------------------------------------------------------------------
# django-otp's own device admins, for superusers only: a device decides who passes the second
# factor, so adding one to an account whose password one knows, or moving one, is a grant
# (accounts.signals audits each device that becomes or stops being a user's confirmed one).


class SecondFactorAdminMixin(ActingAsMixin, SuperuserChangesMixin):
    def has_module_permission(self, request):
        return request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser


for _model, _admin in ((TOTPDevice, TOTPDeviceAdmin), (StaticDevice, StaticDeviceAdmin)):
    admin.site.unregister(_model)
    admin.site.register(_model, type(_admin.__name__, (SecondFactorAdminMixin, _admin), {}))


# --- simplejwt's blacklist ---------------------------------------------------------------------
# A blacklisted refresh token is a revoked or already rotated one: deleting its row would let it
# be used again (its rotation's one-time use gone), and no row of it is audited. Read-only for
# everyone; `manage.py flushexpiredtokens` removes the expired ones.


class BlacklistedTokenAdmin(ReadOnlyMixin, blacklist_admin.BlacklistedTokenAdmin):
    actions = None


admin.site.unregister(BlacklistedToken)
admin.site.register(BlacklistedToken, BlacklistedTokenAdmin)


admin.site.unregister(Group)


@admin.register(Group)
class GroupAdmin(ActingAsMixin, SuperuserChangesMixin, DjangoGroupAdmin):
    """Groups carry permissions: only superusers make or change them (accounts/signals.py
    audits every change of a group's permissions)."""
