"""chatproject/handlers.py: a sync view's request in one hop, answering exactly as Django would."""

import json
import re
import threading

import pytest
from asgiref.sync import SyncToAsync
from django.core import signals
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from chatproject.dbthread import DatabaseThread, database_thread
from chatproject.handlers import OneHopASGIHandler
from tests.asgi_http import call, scope

pytestmark = pytest.mark.django_db(transaction=True)

seen: list[tuple[str, int]] = []


def sync_view(request):
    seen.append(("view", threading.get_ident()))
    response = HttpResponse(f"{request.method} {request.body!r}", content_type="text/plain")
    response.set_cookie("flavour", "plain", httponly=True, samesite="Lax")
    response["X-Thing"] = "é"  # latin-1, as Django encodes header values
    return response


async def async_view(request):
    seen.append(("view", threading.get_ident()))
    return JsonResponse({"async": True})


def streaming_view(request):
    return StreamingHttpResponse((f"row {i}\n" for i in range(3)), content_type="text/csv")


def lazy_streaming_view(request):
    # Reads the body only while the response is being sent.
    return StreamingHttpResponse(chunk for chunk in (b"got ", request.body))


def big_view(request):
    return HttpResponse(
        b"x" * (ASGIHandler.chunk_size + 10), content_type="application/octet-stream"
    )


def failing_view(request):
    raise RuntimeError("boom")


def body_view(request):
    return HttpResponse(len(request.body))


@csrf_exempt
def exempt_body_view(request):
    seen.append(("view", threading.get_ident()))
    return HttpResponse(len(request.body))


urlpatterns = [
    path("t/sync/", sync_view),
    path("t/async/", async_view),
    path("t/stream/", streaming_view),
    path("t/lazy/", lazy_streaming_view),
    path("t/big/", big_view),
    path("t/fail/", failing_view),
    path("t/body/", body_view),
    path("t/exempt-body/", exempt_body_view),
    path("", include("chatproject.urls")),
]


@pytest.fixture(autouse=True)
def _urls(settings):
    settings.ROOT_URLCONF = __name__
    seen.clear()


def _answer(sent: list[dict]) -> tuple:
    start, bodies = sent[0], sent[1:]
    assert start["type"] == "http.response.start"
    assert all(m["type"] == "http.response.body" for m in bodies)
    assert [m.get("more_body", False) for m in bodies] == [True] * (len(bodies) - 1) + [False]
    headers = sorted(
        # The CSRF cookie's value is random on every answer: compare its name.
        (name, value.split(b"=")[0]) if value.startswith(b"csrftoken=") else (name, value)
        for name, value in start["headers"]
    )
    body = b"".join(m.get("body", b"") for m in bodies)
    body = re.sub(rb'name="csrf-token" content="[^"]+"', b"csrf-token", body)
    return start["status"], headers, len(bodies), body


REQUESTS = {
    "sync view, cookie and latin-1 header": ("GET", "/t/sync/", b"", ()),
    "sync view with a body": ("POST", "/t/sync/", b"a=1", ((b"content-type", b"text/plain"),)),
    "HEAD": ("HEAD", "/t/sync/", b"", ()),
    "async view": ("GET", "/t/async/", b"", ()),
    "streaming response": ("GET", "/t/stream/", b"", ()),
    "streaming response reading the body as it goes": ("POST", "/t/lazy/", b"abc", ()),
    "body bigger than one chunk": ("GET", "/t/big/", b"", ()),
    "unknown path": ("GET", "/no/such/page/", b"", ()),
    "view raises": ("GET", "/t/fail/", b"", ()),
    "body of DATA_UPLOAD_MAX_MEMORY_SIZE": ("POST", "/t/body/", b"y" * 2500, ()),
    "API without credentials": ("GET", "/api/rooms/", b"", ()),
    "API with malformed JSON": (
        "POST",
        "/api/auth/token/",
        b"{not json",
        ((b"content-type", b"application/json"),),
    ),
}
SCOPES = {
    "plain": {},
    "under a root path": {"root_path": "/chat"},
    "query string not UTF-8": {"query": b"a=%ff\xff"},
}


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
@pytest.mark.parametrize("scope_args", SCOPES.values(), ids=SCOPES.keys())
@pytest.mark.parametrize("request_", REQUESTS.values(), ids=REQUESTS.keys())
async def test_answers_exactly_as_djangos_own_asgi_handler(request_, scope_args, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2500
    settings.DEBUG_PROPAGATE_EXCEPTIONS = False
    method, path_, body, headers = request_
    if scope_args.get("root_path"):
        path_ = scope_args["root_path"] + path_
    ours = _answer(await call(OneHopASGIHandler(), method, path_, body, headers, **scope_args))
    djangos = _answer(await call(ASGIHandler(), method, path_, body, headers, **scope_args))
    assert ours == djangos


async def test_a_sync_request_crosses_into_one_thread_once_from_start_to_finish(monkeypatch):
    def started(**kwargs):
        seen.append(("started", threading.get_ident()))

    def finished(**kwargs):
        seen.append(("finished", threading.get_ident()))

    handler = OneHopASGIHandler()
    hops = []
    real_call, real_run = SyncToAsync.__call__, DatabaseThread.run

    def counted(self, *args, **kwargs):
        hops.append(self.func)
        return real_call(self, *args, **kwargs)

    def counted_run(self, fn, *args, **kwargs):
        hops.append(fn)
        return real_run(self, fn, *args, **kwargs)

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    monkeypatch.setattr(SyncToAsync, "__call__", counted)
    monkeypatch.setattr(DatabaseThread, "run", counted_run)
    try:
        status, headers, _, body = _answer(await call(handler, "GET", "/t/sync/"))
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    assert len(hops) == 1  # Django's own handler: 19 for this request
    assert (status, body) == (200, b"GET b''")
    assert (b"X-Thing", "é".encode("latin1")) in headers
    assert (b"Set-Cookie", b"flavour=plain; HttpOnly; Path=/; SameSite=Lax") in headers
    assert [event for event, _ in seen] == ["started", "view", "finished"]
    # The database thread: the sockets' database calls' own, with its long-lived connection.
    assert {thread for _, thread in seen} == {database_thread.ident}
    assert threading.get_ident() != database_thread.ident


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
async def test_a_streaming_response_is_closed_in_the_database_thread_once_sent():
    """request_finished closes the connections of the thread the request ran in."""

    def finished(**kwargs):
        seen.append(("finished", threading.get_ident()))

    signals.request_finished.connect(finished)
    try:
        sent = await call(OneHopASGIHandler(), "GET", "/t/stream/")
    finally:
        signals.request_finished.disconnect(finished)
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert b"".join(m.get("body", b"") for m in bodies) == b"row 0\nrow 1\nrow 2\n"
    assert seen == [("finished", database_thread.ident)]


async def test_an_async_view_runs_on_the_event_loop():
    status, _, _, body = _answer(await call(OneHopASGIHandler(), "GET", "/t/async/"))
    assert (status, json.loads(body)) == (200, {"async": True})
    assert seen == [("view", threading.get_ident())]


async def test_a_client_gone_before_its_body_ends_gets_no_view_and_no_answer():
    sent = []
    incoming = [
        {"type": "http.request", "body": b"part", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    await OneHopASGIHandler()(scope("POST", "/t/sync/"), receive, send)
    assert sent == []
    assert seen == []


async def test_only_http_is_served():
    with pytest.raises(ValueError, match="websocket"):
        await OneHopASGIHandler()({"type": "websocket"}, None, None)


async def _post_in_chunks(chunks: list[bytes], headers=()) -> list[dict]:
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    await OneHopASGIHandler()(scope("POST", "/t/exempt-body/", headers), receive, send)
    return sent


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_refused_413_before_any_view(settings, declared):
    """Django checks DATA_UPLOAD_MAX_MEMORY_SIZE only when a view reads request.body or a form
    (400 then, above); DRF's parsers read the stream, so the API parsed JSON of any size. The
    handler refuses it as it comes: by its declared length, or once a chunked body passes it."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2500
    headers = ((b"content-length", b"3000"),) if declared else ()
    status, answer_headers, _, body = _answer(await _post_in_chunks([b"y" * 1000] * 3, headers))
    assert status == 413
    assert (b"content-type", b"application/json") in answer_headers
    assert json.loads(body) == {
        "detail": "request body too large: at most 2500 bytes",
        "code": "too_large",
    }
    assert seen == []  # no view ran


async def test_a_body_of_the_limit_in_chunks_reaches_the_view(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2500
    status, _, _, body = _answer(await _post_in_chunks([b"y" * 1000, b"y" * 1000, b"y" * 500]))
    assert (status, body) == (200, b"2500")


async def test_the_api_refuses_json_over_the_limit(settings):
    """The login view parsed (and, for the per-username limit, normalised) a body of any size."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2500
    body = json.dumps({"username": "x" * 5000, "password": "p"}).encode()
    sent = await call(
        OneHopASGIHandler(),
        "POST",
        "/api/auth/token/",
        body,
        ((b"content-type", b"application/json"),),
    )
    assert _answer(sent)[0] == 413
