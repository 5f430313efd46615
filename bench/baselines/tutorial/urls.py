"""No HTTP pages: the tutorial baseline only serves WebSockets."""

urlpatterns = []
