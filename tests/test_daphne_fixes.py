"""chatproject/server.py's direct socket write is taken only where it cannot corrupt the stream."""

import asyncio
import contextlib
import gc
import socket
import sys
import weakref

import pytest
from daphne.cli import CommandLineInterface
from django.core.management import call_command
from twisted.internet import protocol, reactor, ssl, tcp
from twisted.protocols.tls import TLSMemoryBIOFactory

import chatproject
from accounts.middleware import take_ticket
from chatproject.server import HANDSHAKE_LEFTOVERS, Inbox, _writes_directly
from tests.wait import eventually


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1: a real peer and host address for daphne."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, theirs


@pytest.fixture
def tcp_server():
    """Twisted's server-side TCP connection over one end of a socket pair, for `app`."""
    made = []

    def make(app: protocol.Protocol) -> tcp.Server:
        ours, theirs = _tcp_pair()
        ours.setblocking(False)
        transport = tcp.Server(ours, app, ("127.0.0.1", 1), None, 1, reactor)
        transport.repstr = "<test connection>"  # set by the listening port when it accepts
        transport.test_peer = theirs  # the client's end, for tests that read what was sent
        made.append((transport, ours, theirs))
        app.makeConnection(transport)
        return transport

    yield make
    for transport, ours, theirs in made:
        # Unregister from the (shared asyncio) reactor before the fd number can be reused.
        transport.stopReading()
        transport.stopWriting()
        ours.close()
        theirs.close()


@pytest.fixture
def plain_transport(tcp_server) -> tcp.Server:
    return tcp_server(protocol.Protocol())


@pytest.fixture
def tls_app_transport(tcp_server):
    """What a WebSocket protocol gets as its transport under `daphne -e ssl:...`."""
    app_factory = protocol.Factory.forProtocol(protocol.Protocol)
    tls = TLSMemoryBIOFactory(ssl.CertificateOptions(), False, app_factory).buildProtocol(None)
    tcp_server(tls)
    return tls.wrappedProtocol.transport


def test_idle_plain_tcp_socket_is_written_directly(plain_transport):
    assert _writes_directly(plain_transport)


def test_plain_tcp_with_queued_bytes_goes_through_twisted_to_keep_order(plain_transport):
    plain_transport.write(b"queued first")
    assert not _writes_directly(plain_transport)


def test_tls_transport_is_never_written_directly(tls_app_transport):
    # The wrapper forwards TLS, socket and dataBuffer to the cleartext TCP connection beneath,
    # which looks idle and unencrypted: a direct write would bypass the encryption.
    assert not _writes_directly(tls_app_transport)


def test_closing_transport_is_not_written_directly(plain_transport):
    plain_transport.loseConnection()
    assert not _writes_directly(plain_transport)


# --- what an open socket keeps (chatproject/server.py) -------------------------------------------

TICKET = "tk.SECRET-TICKET-VALUE"


def _handshake(path: str, protocols: list[str]) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Origin: http://127.0.0.1",
        # As browsers and `websockets` offer it: autobahn calls perMessageCompressionAccept.
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        f"Sec-WebSocket-Protocol: {', '.join(protocols)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def daphne_server():
    """daphne's Server with our fixes, as `manage.py serve` runs it, minus the listening."""
    from daphne import server as daphne_server_module

    from chatproject.server import install_daphne_fixes

    made = []

    def make(application):
        server_class = install_daphne_fixes()
        server = server_class(application=application, endpoints=["tcp:port=0"])
        server.connections = {}
        factory = daphne_server_module.WebSocketFactory(server, server="test")
        factory.setProtocolOptions(allowNullOrigin=True, maxMessagePayloadSize=4321)
        made.append(server)
        return server, factory

    yield make
    for server in made:
        for details in server.connections.values():
            if "application_instance" in details:
                details["application_instance"].cancel()


async def _open(tcp_server, factory, handshake: bytes, query: bytes = b""):
    protocol = factory.buildProtocol(("127.0.0.1", 1))
    protocol._raw_query_string = query  # set by daphne's HTTP protocol before the upgrade
    tcp_server(protocol)
    protocol.dataReceived(handshake)
    await eventually(lambda: protocol.state == protocol.STATE_OPEN, "the handshake opened")
    return protocol


def ticket_auth_like(inner):
    """What TicketAuthMiddleware does to the scope, without a database: take the ticket out."""

    async def app(scope, receive, send):
        token, _ = take_ticket(scope)
        assert token == TICKET
        await inner(scope, receive, send)

    return app


@pytest.mark.parametrize("transport", ["subprotocol", "query"])
async def test_an_open_socket_keeps_nothing_of_its_handshake(tcp_server, daphne_server, transport):
    seen = {}

    async def application(scope, receive, send):
        seen["scope"] = scope
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept", "subprotocol": "chat.v1"})
        await receive()

    _, factory = daphne_server(ticket_auth_like(application))
    protocols = ["chat.v1"] + ([f"ticket.{TICKET}"] if transport == "subprotocol" else [])
    query = f"ticket={TICKET}".encode() if transport == "query" else b""
    path = "/ws/rooms/lobby/" + (f"?{query.decode()}" if query else "")
    protocol = await _open(tcp_server, factory, _handshake(path, protocols), query)

    kept = vars(protocol)
    assert not set(HANDSHAKE_LEFTOVERS) & set(kept)
    assert protocol.request.path == "/ws/rooms/lobby/"  # what daphne's log lines read
    assert TICKET not in repr(kept)
    assert TICKET.encode() not in b"".join(v for v in kept.values() if isinstance(v, bytes))
    # ...nor in the scope daphne built, which the frames above the middleware hold.
    assert TICKET not in repr(seen["scope"])


async def accepting(scope, receive, send):
    """An application that accepts the socket and waits."""
    await receive()
    await send({"type": "websocket.accept"})
    await receive()


async def test_protocol_options_live_on_the_class_not_on_each_socket(tcp_server, daphne_server):
    server, factory = daphne_server(accepting)
    protocol = await _open(tcp_server, factory, _handshake("/ws/rooms/lobby/", ["chat.v1"]))
    assert not set(protocol.CONFIG_ATTRS) & set(vars(protocol))
    # The values are the factory's, setProtocolOptions() after construction included.
    assert protocol.maxMessagePayloadSize == factory.maxMessagePayloadSize == 4321
    assert protocol.failByDrop is False  # our reset of autobahn's default
    assert isinstance(server.connections[protocol]["application_instance"], asyncio.Future)
    assert isinstance(protocol.application_queue, Inbox)


async def test_sending_lifts_the_payload_limit_for_the_call_only(tcp_server, daphne_server):
    _, factory = daphne_server(accepting)
    protocol = await _open(tcp_server, factory, _handshake("/ws/rooms/lobby/", ["chat.v1"]))
    protocol.serverSend("x" * 5000)  # over the limit on what a client may send: not refused
    assert "maxMessagePayloadSize" not in vars(protocol)
    assert protocol.maxMessagePayloadSize == 4321


@pytest.mark.parametrize(
    "offered",
    [
        pytest.param(b"chat.v1, ticket.\xe9", id="latin-1-ticket"),
        pytest.param(b"chat.v1\xff", id="byte-ff"),
        pytest.param(b"chat.v1, ticket.\xc3\xa9", id="utf-8-ticket"),
    ],
)
@pytest.mark.parametrize("origin", [b"http://127.0.0.1", b"http://evil.example"])
async def test_handshake_with_non_ascii_subprotocols_is_refused_400(
    tcp_server, daphne_server, caplog, offered, origin
):
    """daphne decodes Sec-WebSocket-Protocol as ASCII: one byte over 0x7f, from anyone, before
    the Origin check and any rate limit, was a 500 and an ERROR with a traceback in the log.
    Subprotocols are tokens (RFC 6455 4.1), ASCII by their grammar: a 400, and no log line."""
    seen = []

    async def application(scope, receive, send):
        seen.append(scope)

    _, factory = daphne_server(application)
    protocol = factory.buildProtocol(("127.0.0.1", 1))
    protocol._raw_query_string = b""
    tcp_server(protocol)
    handshake = _handshake("/ws/rooms/lobby/", ["chat.v1"])
    handshake = handshake.replace(b"Origin: http://127.0.0.1", b"Origin: " + origin)
    protocol.dataReceived(handshake.replace(b"Protocol: chat.v1", b"Protocol: " + offered))
    protocol.transport.doWrite()
    peer = protocol.transport.test_peer
    peer.setblocking(False)
    answer = await _read(peer, len(b"HTTP/1.1 400"))
    assert answer.startswith(b"HTTP/1.1 400")
    assert not seen
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        pytest.param(b"Origin", b"http://127.0.0.1:80x", id="origin-port"),  # autobahn's 400
        pytest.param(b"Sec-WebSocket-Protocol", b"chat.v1, ticket.\xe9", id="subprotocol"),
    ],
)
async def test_a_handshake_refused_before_daphne_saw_it_closes_without_an_error(
    tcp_server, daphne_server, header, value
):
    """A handshake refused before daphne's onConnect (autobahn's own 400s, ours above) never
    got daphne's `server`: its onClose raised AttributeError, which Twisted logged as an
    "Unhandled Error" with a traceback (CRITICAL under `serve -v 2` and above), per request."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    _, factory = daphne_server(accepting)
    protocol = factory.buildProtocol(("127.0.0.1", 1))
    protocol._raw_query_string = b""
    tcp_server(protocol)
    handshake = _handshake("/ws/rooms/lobby/", ["chat.v1"])
    old = b"Origin: http://127.0.0.1" if header == b"Origin" else b"Protocol: chat.v1"
    new = header + b": " + value if header == b"Origin" else b"Protocol: " + value
    protocol.dataReceived(handshake.replace(old, new))
    protocol.transport.doWrite()
    peer = protocol.transport.test_peer
    peer.setblocking(False)
    assert (await _read(peer, len(b"HTTP/1.1 400"))).startswith(b"HTTP/1.1 400")
    protocol.connectionLost(Failure(ConnectionDone()))  # raised AttributeError


# --- HTTP requests: Twisted's form parsing is skipped (chatproject/server.py) ---------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"room": "lobby"}'),
        ("application/x-www-form-urlencoded", b"room=lobby&x=%26"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="a"'),
    ],
)
async def test_a_posted_body_reaches_the_application_unparsed(
    tcp_server, daphne_server, monkeypatch, content_type, body
):
    from daphne import server as daphne_server_module
    from twisted.web import http

    def parsed(line):
        raise AssertionError("Twisted parsed the Content-Type to parse a form")

    monkeypatch.setattr(http, "_parseContentType", parsed)
    seen = {}

    async def application(scope, receive, send):
        seen["body"] = (await receive())["body"]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    server, _ = daphne_server(application)
    protocol = daphne_server_module.HTTPFactory(server).buildProtocol(("127.0.0.1", 1))
    tcp_server(protocol)
    head = (
        f"POST /api/tickets/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    protocol.dataReceived(head.encode() + body)
    await eventually(lambda: "body" in seen, "the app read the body")
    assert seen.get("body") == body
    request = next(iter(server.connections))
    assert request.args == {}  # no form parsed into it


async def test_the_access_log_never_writes_a_query_string(tcp_server, daphne_server):
    """daphne's access log (stdout, the journal under systemd; not a logging record, so no
    redaction filter sees it) wrote an HTTP request's URI whole: a ticket presented in
    `?ticket=` to a request that was not upgraded to a socket went in clear, unused and still
    valid. As the shipped proxies log $uri: the path, never the query."""
    import io

    from daphne import server as daphne_server_module
    from daphne.access import AccessLogGenerator

    async def application(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    server, _ = daphne_server(application)
    server.action_logger = AccessLogGenerator(log := io.StringIO())
    protocol = daphne_server_module.HTTPFactory(server).buildProtocol(("127.0.0.1", 1))
    tcp_server(protocol)
    protocol.dataReceived(
        f"GET /ws/rooms/lobby/?ticket={TICKET}&x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    )
    await eventually(lambda: "GET" in log.getvalue(), "the request was logged")
    assert '"GET /ws/rooms/lobby/" 404' in log.getvalue()
    assert TICKET not in log.getvalue()


# --- reading frames (chatproject/server.py) -------------------------------------------------------

MASK = b"\x9a\x01\xfe\x33"


def _masked(payload: bytes, mask: bytes = MASK) -> bytes:
    """The payload as a client masks it (RFC 6455 5.3), computed byte by byte."""
    return bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def _client_frame(payload: bytes, *, opcode: int = 0x1, fin: bool = True) -> bytes:
    size = len(payload)
    if size < 126:
        length = bytes([0x80 | size])
    elif size < 65536:
        length = bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + size.to_bytes(8, "big")
    return bytes([(0x80 if fin else 0) | opcode]) + length + MASK + _masked(payload)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 100, 1023, 1024, 1025, 5000])
@pytest.mark.parametrize("cut", [0, 1, 2, 3, 7])
def test_unmasking_matches_the_rfc_whatever_the_pieces(size, cut):
    from autobahn.websocket.xormasker import create_xor_masker as autobahn_masker

    from chatproject.server import SmallFrameUnmasker

    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    masked = _masked(payload)
    for masker in (SmallFrameUnmasker(MASK), autobahn_masker(MASK, size)):
        head, tail = masked[: min(cut, size)], masked[min(cut, size) :]
        out = masker.process(head) + masker.process(tail)
        assert out == payload
        assert masker.pointer() == size
        masker.reset()
        assert masker.pointer() == 0


def test_frames_up_to_1_kb_are_unmasked_by_ours_and_longer_ones_by_autobahn():
    from autobahn.websocket import protocol as autobahn_protocol

    from chatproject.server import SmallFrameUnmasker, install_daphne_fixes

    install_daphne_fixes()
    make = autobahn_protocol.create_xor_masker  # what autobahn's frame parser calls
    assert isinstance(make(MASK, 0), SmallFrameUnmasker)
    assert isinstance(make(MASK, 1024), SmallFrameUnmasker)
    assert not isinstance(make(MASK, 1025), SmallFrameUnmasker)
    assert not isinstance(make(MASK, None), SmallFrameUnmasker)


def _texts_received():
    texts = []

    async def application(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept", "subprotocol": "chat.v1"})
        while (message := await receive())["type"] == "websocket.receive":
            texts.append(message["text"])

    return texts, application


async def test_frames_of_every_size_and_split_reach_the_application_intact(
    tcp_server, daphne_server
):
    texts, application = _texts_received()
    _, factory = daphne_server(application)
    protocol = await _open(tcp_server, factory, _handshake("/ws/rooms/lobby/", ["chat.v1"]))
    sent = ["", "é", "x" * 125, "€" * 400, "y" * 1024, "z" * 1025, "w" * 4000]
    stream = b"".join(_client_frame(text.encode()) for text in sent)
    # Fragmented: one message in three frames (text, continuation, final continuation).
    stream += _client_frame(b"frag", fin=False) + _client_frame(b"ment", opcode=0, fin=False)
    stream += _client_frame(b"ed", opcode=0)
    sent.append("fragmented")
    for at in range(0, len(stream), 97):  # reads that cut frames, headers and masks anywhere
        protocol.dataReceived(stream[at : at + 97])
    await eventually(lambda: len(texts) >= len(sent), "every message arrived")
    assert texts == sent


async def test_message_observers_still_hear_every_message(tcp_server, daphne_server):
    texts, application = _texts_received()
    _, factory = daphne_server(application)
    protocol = await _open(tcp_server, factory, _handshake("/ws/rooms/lobby/", ["chat.v1"]))
    heard = []
    protocol.on("message", lambda payload, is_binary: heard.append(payload))
    protocol.dataReceived(_client_frame(b"one") + _client_frame(b"two"))
    await eventually(lambda: len(texts) >= 2, "both messages arrived")
    assert texts == ["one", "two"]
    assert heard == [b"one", b"two"]


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_autobahn_read_debug_line_is_made_only_when_logged(
    tcp_server, daphne_server, monkeypatch, level
):
    import txaio

    texts, application = _texts_received()
    _, factory = daphne_server(application)
    protocol = await _open(tcp_server, factory, _handshake("/ws/rooms/lobby/", ["chat.v1"]))
    log = txaio.make_logger()
    log.set_log_level(level)
    monkeypatch.setattr(protocol, "log", log)
    formatted = []
    monkeypatch.setattr("autobahn.twisted.websocket.hltype", lambda f: formatted.append(f) or "")
    protocol.dataReceived(_client_frame(b"hello"))
    await eventually(lambda: len(texts) >= 1, "the message arrived")
    assert texts == ["hello"]
    assert bool(formatted) is (level == "debug")


# --- writing frames: one send() per socket per turn of the loop (chatproject/server.py) ----------


class SendRecorder:
    """A socket whose send() calls are recorded; everything else is the real socket's."""

    def __init__(self, real: socket.socket) -> None:
        self.real, self.sends = real, []

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        return self.real.send(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


async def _open_recorded(tcp_server, daphne_server):
    _, factory = daphne_server(accepting)
    protocol = await _open(tcp_server, factory, _handshake("/ws/rooms/lobby/", ["chat.v1"]))
    # The harness's reactor does not drive this socket: push the handshake's answer out of
    # Twisted's buffer, as the reactor would once the socket is writable.
    protocol.transport.doWrite()
    assert _writes_directly(protocol.transport)
    peer = protocol.transport.test_peer
    peer.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        peer.recv(65536)  # the 101 answer
    recorder = SendRecorder(protocol.transport.socket)
    protocol.transport.socket = recorder
    return protocol, recorder, peer


def _frame(text: str) -> bytes:
    from chat import frames

    return frames.prepared(text).payloadHybi


async def _read(peer, size: int) -> bytes:
    got = bytearray()

    def enough() -> bool:
        with contextlib.suppress(BlockingIOError):
            got.extend(peer.recv(65536))
        return len(got) >= size

    await eventually(enough, f"{size} bytes arrived")
    return bytes(got)


async def test_frames_written_in_one_turn_leave_in_one_send_in_order(tcp_server, daphne_server):
    from chat import frames

    protocol, recorder, peer = await _open_recorded(tcp_server, daphne_server)
    assert protocol.send_prepared(frames.prepared("ack"), cork=True)
    assert protocol.send_prepared(frames.prepared("message"))  # behind the corked one
    protocol.sendMessage(b"through autobahn")  # daphne's path for an ASGI send
    assert recorder.sends == []  # not before the turn ends
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    expected = _frame("ack") + _frame("message") + _frame("through autobahn")
    assert recorder.sends == [expected]
    assert await _read(peer, len(expected)) == expected


async def test_corked_frames_go_before_a_frame_autobahn_sends_its_own_way(
    tcp_server, daphne_server
):
    from chat import frames

    protocol, _, peer = await _open_recorded(tcp_server, daphne_server)
    assert protocol.send_prepared(frames.prepared("first"), cork=True)
    protocol.sendData(_frame("second"), sync=True)  # autobahn's queue, then Twisted's buffer
    protocol.transport.doWrite()  # as the reactor would, before the turn ends
    expected = _frame("first") + _frame("second")
    assert await _read(peer, len(expected)) == expected


@pytest.mark.parametrize("abort", [False, True])
async def test_corked_frames_are_sent_before_the_connection_is_dropped(
    tcp_server, daphne_server, abort
):
    from chat import frames

    protocol, recorder, peer = await _open_recorded(tcp_server, daphne_server)
    assert protocol.send_prepared(frames.prepared("last words"), cork=True)
    protocol.dropConnection(abort=abort)  # in the same turn: sent before the socket closes
    assert recorder.sends == [_frame("last words")]
    assert await _read(peer, len(_frame("last words"))) == _frame("last words")


async def test_corked_frames_go_before_the_close_frame_of_an_application_close(
    tcp_server, daphne_server
):
    from chat import frames

    protocol, recorder, peer = await _open_recorded(tcp_server, daphne_server)
    assert protocol.send_prepared(frames.prepared("bye"), cork=True)
    protocol.handle_reply({"type": "websocket.close", "code": 4403, "reason": "forbidden"})
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    close = b"\x88" + bytes([2 + len(b"forbidden")]) + (4403).to_bytes(2, "big") + b"forbidden"
    assert b"".join(recorder.sends) == _frame("bye") + close
    assert await _read(peer, len(_frame("bye") + close)) == _frame("bye") + close


async def test_a_lost_connection_keeps_no_corked_frames_in_memory(tcp_server, daphne_server):
    # Memory, not delivery: a lost connection's frames cannot be sent anyway; they must not
    # stay in the process-wide dict, holding the protocol.
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from chat import frames
    from chatproject.server import CORKS

    protocol, recorder, _ = await _open_recorded(tcp_server, daphne_server)
    assert protocol.send_prepared(frames.prepared("never sent"), cork=True)
    assert protocol in CORKS.frames
    protocol.connectionLost(Failure(ConnectionDone()))
    assert protocol not in CORKS.frames
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert recorder.sends == []


async def test_a_frame_not_corked_leaves_at_once(tcp_server, daphne_server):
    from chat import frames

    protocol, recorder, _ = await _open_recorded(tcp_server, daphne_server)
    assert protocol.send_prepared(frames.prepared("alone"))
    assert recorder.sends == [_frame("alone")]


def test_a_write_with_no_event_loop_running_is_sent_at_once():
    from chatproject.server import Corks

    class Protocol:
        def __init__(self):
            self.sent = []

        def _send_now(self, data):
            self.sent.append(data)

    corks, protocol = Corks(), Protocol()
    corks.add(protocol, b"frame")
    assert protocol.sent == [b"frame"]
    assert corks.frames == {}


async def test_a_socket_whose_corked_frames_cannot_be_written_is_dropped():
    # Its client would otherwise miss frames without knowing; dropped, it reconnects and
    # resumes from its last seq.
    from chatproject.server import Corks

    class Protocol:
        client_addr = ["127.0.0.1", 1]

        def __init__(self, fails: bool):
            self.fails, self.sent, self.dropped = fails, [], None

        def _send_now(self, data):
            if self.fails:
                raise RuntimeError("the transport refused")
            self.sent.append(data)

        def dropConnection(self, abort=False):
            self.dropped = abort

    corks, broken, fine = Corks(), Protocol(fails=True), Protocol(fails=False)
    corks.add(broken, b"a")
    corks.add(fine, b"b")
    corks.frames[fine].append(b"c")
    await asyncio.sleep(0)
    assert broken.dropped is True
    assert (fine.sent, fine.dropped) == ([b"bc"], None)
    assert corks.frames == {}


def test_serve_freezes_the_heap_it_started_with_after_collecting_its_garbage(monkeypatch):
    """`manage.py serve` exempts what starting up built from the cyclic collector's passes
    (chatproject.server.freeze_startup_heap), with the application imported (as with
    --skip-checks: nothing imported it before), after a collection: garbage left in a cycle by
    then is freed, not frozen for ever."""

    class Cycle:
        pass

    seen = {}

    def run(cli, argv):
        seen.update(
            frozen=gc.get_freeze_count(),
            application="chatproject.asgi" in sys.modules,
            garbage_freed=left_behind() is None,
            application_arg=argv[-1],
        )

    monkeypatch.setattr(CommandLineInterface, "run", run)
    monkeypatch.setattr("chat.management.commands.serve._replay_audit_spool", lambda: None)
    monkeypatch.setattr("chatproject.server.finish_event_loop", lambda: None)
    # Imported again by serve; the module and the package's attribute are put back after.
    monkeypatch.delitem(sys.modules, "chatproject.asgi", raising=False)
    monkeypatch.setattr(chatproject, "asgi", getattr(chatproject, "asgi", None), raising=False)
    gc.unfreeze()
    was = gc.isenabled()
    gc.disable()  # from here to the freeze, no collection but serve's own
    try:
        left = Cycle()
        left.me = left
        left_behind = weakref.ref(left)
        del left
        call_command("serve", "--port", "0")
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
    assert seen, "serve never reached daphne's CLI"
    assert seen["application_arg"] == "chatproject.asgi:application"
    assert seen["application"]
    assert seen["garbage_freed"]
    assert seen["frozen"] > 10_000  # Django and the application: about 200,000 objects
