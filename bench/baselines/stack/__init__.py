"""The chat's own server and settings, with four views that do nothing (the `layers` scenario).

Each view reads a ticket-shaped POST's body and answers with the same fixed body, one layer
more each time: a Django view, a DRF `APIView`, the same with simplejwt's stateless
authentication, the same with its `JWTAuthentication`; and a fifth with the chat's own
authentication in its place. Behind the chat's middleware and HTTP handler, in the chat's
process, beside the real `/api/tickets/`.
"""
