from django.contrib.auth import views as auth_views
from django.urls import path

from accounts.throttling import throttle_login
from chat import views

urlpatterns = [
    path(
        "login/",
        throttle_login(views.SignInView.as_view()),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.room_list, name="rooms"),
    path("rooms/<slug:slug>/", views.room_page, name="room"),
]
