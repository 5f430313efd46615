"""daphne alone: an ASGI app that does nothing, the floor under every daphne figure.

A POST gets 201 and a fixed JSON body the size of a ticket's answer; a WebSocket is accepted
and held until the client closes it. No Django, no Channels. `python -m bench` measures it in
its `layers` scenario, with the same daphne flags as the chat and the tutorial.
"""

import json

# What a ticket request's answer looks like (accounts/api.py), fixed; the stack's views
# (bench/baselines/stack) answer with it too.
ANSWER = {"ticket": "t" * 220, "expires_at": "2026-01-01T00:00:30Z", "ws_url": "/ws/rooms/room/"}
BODY = json.dumps(ANSWER).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def application(scope, receive, send):
    if scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 201, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
