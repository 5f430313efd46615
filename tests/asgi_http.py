"""Calling an ASGI app with one HTTP request, in process."""

import asyncio


def scope(
    method: str,
    path_: str,
    headers=(),
    *,
    query: bytes = b"",
    root_path: str = "",
    scheme: str = "http",
) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path_,
        "raw_path": path_.encode(),
        "query_string": query,
        "root_path": root_path,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


async def call(
    app, method: str, path_: str, body: bytes = b"", headers=(), **scope_args
) -> list[dict]:
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # a client that stays: no disconnect
        return None

    async def send(message):
        sent.append(message)

    await app(scope(method, path_, headers, **scope_args), receive, send)
    return sent
