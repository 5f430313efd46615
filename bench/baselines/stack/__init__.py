"""The chat's own server and settings, with three views that do nothing (the `layers` scenario).

Each view answers a ticket-shaped POST with the same fixed body, one layer more each time:
a Django view, a DRF `APIView`, the same with simplejwt's `JWTAuthentication`. Behind the
chat's middleware and HTTP handler, in the chat's process, beside the real `/api/tickets/`.
"""
