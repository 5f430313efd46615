from django.urls import path

from accounts import api

urlpatterns = [
    path("auth/token/", api.LoginView.as_view(), name="token-obtain"),
    path("auth/token/refresh/", api.RefreshView.as_view(), name="token-refresh"),
    path("auth/logout/", api.LogoutView.as_view(), name="token-logout"),
    path("tickets/", api.TicketCreateView.as_view(), name="ticket-create"),
]
