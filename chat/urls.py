from django.urls import path, register_converter

from chat import api, converters

register_converter(converters.SeqConverter, "seq")
register_converter(converters.UsernameConverter, "username")

urlpatterns = [
    path("rooms/", api.RoomListView.as_view(), name="room-list"),
    path("rooms/<slug:slug>/", api.RoomDetailView.as_view(), name="room-detail"),
    path("rooms/<slug:slug>/archive/", api.RoomArchiveView.as_view(), name="room-archive"),
    path("rooms/<slug:slug>/join/", api.RoomJoinView.as_view(), name="room-join"),
    path("rooms/<slug:slug>/read/", api.RoomReadView.as_view(), name="room-read"),
    path("rooms/<slug:slug>/messages/", api.MessageListView.as_view(), name="message-list"),
    path(
        "rooms/<slug:slug>/messages/<seq:seq>/",
        api.MessageDetailView.as_view(),
        name="message-detail",
    ),
    path("rooms/<slug:slug>/members/", api.MemberListView.as_view(), name="member-list"),
    path(
        "rooms/<slug:slug>/members/<username:username>/",
        api.MemberDetailView.as_view(),
        name="member-detail",
    ),
]
