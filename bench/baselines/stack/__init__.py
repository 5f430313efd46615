"""The chat's own server and settings, with five views that do nothing (the `layers` scenario).

Each view reads a ticket-shaped POST's body and answers with the same fixed body, one layer
more each time: a Django view, a DRF `APIView`, the same with simplejwt's stateless
authentication, with its `JWTAuthentication`, and with the chat's own authentication. Behind
the chat's middleware and HTTP handler, in the chat's process, beside the real `/api/tickets/`.
"""
