"""Running daphne the way this project needs it (used by `manage.py serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import importlib
import logging
import pprint
import time
from functools import partial
from typing import Any

# Not the reactor: importing these installs none (daphne installs asyncio's before it starts).
from twisted.internet import tcp

logger = logging.getLogger("chat.server")

# At shutdown, a cancelled socket's cleanup (close 1001, leave caps and presence, record the
# close) gets SHUTDOWN_CANCEL_GRACE before it is cancelled again, and the wait for them all
# ends after SHUTDOWN_CANCEL_WITHIN: most of the unit's TimeoutStopSec (30 s, deploy/systemd)
# is left for writing the queued audit rows.
SHUTDOWN_CANCEL_GRACE = 2.0
SHUTDOWN_CANCEL_WITHIN = 10.0

# A socket whose reader stopped reading: the close code its application sees (RFC 6455 1008,
# policy violation), so the audit trail says why it went.
CLOSE_SLOW_READER = 1008


def install_daphne_fixes() -> type:
    """Make daphne build its WebSocket factory from our subclasses; return the Server class to
    run (daphne's, with a lighter inbox per connection). Call before it starts.

    - Close frames: the ASGI spec carries `reason` on websocket.close, but daphne passes only
      the code to autobahn (django/daphne#374); and autobahn's sendClose() accepts only 1000 and
      3000-4999 from applications, so a server could never say 1001 (going away), 1011 or 1013
      (try again later), all of which RFC 6455 lets a server send. Our protocol writes the close
      frame itself, code and reason, for open sockets (a handshake refusal stays an HTTP 403).
    - Clean failures: autobahn's default (failByDrop) hangs up on a bad connection, e.g. a frame
      over the size limit, so the client sees 1006 instead of the documented 1009. Ours fails
      with a close frame. A handshake refused before daphne's onConnect (autobahn's own 400s,
      a subprotocol that is not ASCII) closes without daphne's onClose, which raised for it.
    - Fan-out: send_prepared() writes a frame the hub framed once (autobahn's PreparedMessage)
      straight to the transport, instead of one ASGI message, one UTF-8 encoding and one framing
      per recipient. Frames a turn of the event loop writes to one socket in a row (a batch's
      acks, a room's messages from one batch) can leave in one send() at the end of the turn
      (Corks); anything that closes the connection or writes the ordinary way sends them first.
    - Slow readers: Twisted buffers every write without limit, so a client that stops reading in
      a busy room would grow the server's memory forever. A push producer on each transport
      learns when its buffer is full; a socket still backed up after CHAT_SLOW_CLIENT_TIMEOUT
      seconds, or with more than CHAT_SLOW_CLIENT_MAX_BYTES queued meanwhile, is dropped.
    - Idle memory (docs/performance.md): an open socket lets go of its handshake, which also
      held the ticket (_forget_handshake); autobahn's options live on a class, not on each
      socket; daphne's asyncio.Queue per connection is an Inbox; autobahn's send_queue a list.
    - Reading frames: autobahn formats a colourised debug line for every read whether or not
      it is logged, fires a `message` event with a Deferred for every message though nothing
      observes it, and makes a cffi object to unmask every frame. Ours formats the line only
      when autobahn's debug logging is on, fires the event only to observers, and unmasks
      small frames with Python's integers (SmallFrameUnmasker).
    - HTTP bodies: Twisted parses a POSTed form into `request.args` by default, which daphne
      never reads (it hands the body to the application as it came). Finding out whether a
      body is a form parses the Content-Type through the email package: 40-60 µs of every
      ticket request. Our requests skip it.
    - Shutdown: daphne's kill_all_applications raised KeyError on a connection with no
      application yet (a request arriving, an upgrade under a second old), so the sockets were
      dropped (1006) before they could say 1001. Ours skips those connections.
    - Access log: daphne writes an HTTP request's URI whole, query string included, to its
      stream (no logging filter sees it). Ours writes the path only, as the proxies do.
    """
    import txaio
    from autobahn.websocket import protocol as autobahn_protocol
    from autobahn.websocket.types import ConnectionDeny
    from daphne import http_protocol, server, ws_protocol
    from django.conf import settings
    from twisted.internet import defer, reactor
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    if getattr(server.WebSocketFactory, "chat_fixes", False):
        return server.WebSocketFactory.server_to_run

    @implementer(IPushProducer)
    class SlowReaderWatch:
        """Told by the transport when its write buffer fills up and when it drains again."""

        def __init__(self, protocol):
            self.protocol = protocol
            self.backed_up_since: float | None = None
            self.queued = 0
            self.timer = None

        def pauseProducing(self):
            if self.backed_up_since is None:
                self.backed_up_since, self.queued = time.monotonic(), 0
                self.timer = reactor.callLater(settings.CHAT_SLOW_CLIENT_TIMEOUT, self.drop)

        def resumeProducing(self):
            self.backed_up_since = None
            self._cancel()

        def stopProducing(self):
            self._cancel()

        def written(self, size: int) -> None:
            if self.backed_up_since is not None:
                self.queued += size
                if self.queued > settings.CHAT_SLOW_CLIENT_MAX_BYTES:
                    self.drop()

        def drop(self):
            self._cancel()
            self.protocol.dropped_as_slow = True
            self.protocol.dropConnection(abort=True)

        def _cancel(self):
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.timer = None

    # What a txaio logger's method is for a level that is off (txaio swaps in one no-op).
    silent = txaio.make_logger()
    silent.set_log_level("none")
    log_off = silent.debug

    class ChatWebSocketProtocol(ws_protocol.WebSocketProtocol):
        dropped_as_slow = False
        watch = None

        def dataReceived(self, data):  # Twisted's name
            """autobahn's, minus the debug line it formats for every read, logging on or off:
            four colourised `click.style` strings, a third of what reading a frame costs."""
            if self.log.debug is log_off:
                self._dataReceived(data)
            else:
                super().dataReceived(data)

        def onMessageEnd(self):  # autobahn's name
            """autobahn's, without firing its `message` event to observers when there are none
            (daphne registers none): that built and resolved a Deferred for every message."""
            if self._listeners is not None or self.failedByMe or self.trackedTimings:
                super().onMessageEnd()
                return
            payload = b"".join(self.message_data)
            self._onMessage(payload, self.message_is_binary)
            self.message_data = None

        def onConnect(self, request):  # autobahn's name
            """daphne's, for offered subprotocols that are ASCII, as RFC 6455 4.1's tokens are:
            daphne decodes them as ASCII, and one byte over 0x7f, from any client, before the
            Origin check, the audit and any rate limit, was a 500 and an ERROR with a traceback
            in the log. Now a 400, written by autobahn."""
            if not request.headers.get("sec-websocket-protocol", "").isascii():
                raise ConnectionDeny(400, "Sec-WebSocket-Protocol is not ASCII")
            return super().onConnect(request)

        def _connectionMade(self):  # autobahn's name
            super()._connectionMade()
            # A deque allocates a 64-slot block (760 bytes) before its first item; this queue
            # holds frames only on autobahn's sync and chopped paths, which daphne does not take.
            self.send_queue = SendQueue()

        def onOpen(self):
            super().onOpen()
            self._forget_handshake()
            self.watch = SlowReaderWatch(self)
            try:
                # twisted.web's HTTPChannel registered itself before daphne upgraded the
                # connection; the socket is ours now.
                self.transport.unregisterProducer()
                self.transport.registerProducer(self.watch, True)
            except Exception:
                logger.exception("could not watch %s for slow reading", self.client_addr)
                self.watch = None

        def _forget_handshake(self):
            """Let go of the opening handshake once the socket is open.

            autobahn keeps the request as received and as parsed, and its response; daphne the
            request and its header list. Neither reads them again (daphne's log lines read the
            path): about 4 KB per idle socket, and with the subprotocol or query transport the
            ticket itself, in memory a core dump or a debugger can read.
            """
            for name in HANDSHAKE_LEFTOVERS:
                self.__dict__.pop(name, None)
            self.request = OpenedRequest(self.request.path)

        def onClose(self, wasClean, code, reason):
            if self.watch is not None:
                self.watch.stopProducing()
            if "server" not in vars(self):
                # Refused before daphne's onConnect ran (autobahn's own 400s, onConnect's
                # above): daphne never registered the connection, and its onClose, reading
                # `self.server`, raised AttributeError for Twisted to log as unhandled.
                return
            super().onClose(wasClean, CLOSE_SLOW_READER if self.dropped_as_slow else code, reason)

        def send_prepared(self, prepared, cork: bool = False) -> bool:
            """Write a frame framed once for many sockets (the hub's fan-out); False if closed.

            `cork`: more frames for this socket are likely to follow in this turn of the event
            loop (a batch's acks, a room's several messages): send them together at its end.
            """
            if self.state != self.STATE_OPEN:
                return False
            data = prepared.payloadHybi
            if self.watch is not None:
                self.watch.written(len(data))
                if self.state != self.STATE_OPEN:
                    return False  # that was one write too many: dropped as a slow reader
            if self._perMessageCompress is not None or self.send_queue:
                # Compression, or autobahn has queued frames of its own: its path keeps order.
                self.sendPreparedMessage(prepared)
                return True
            self._write(data, cork)
            return True

        def sendData(self, data, sync=False, chopsize=None):  # autobahn's name
            """Frames written the ordinary way: closes, pings and pongs, and anything sent
            through daphne (the consumers' frames go through send_prepared).

            autobahn's own version hands each frame to transport.write(): see _write().
            """
            if (
                chopsize
                or sync
                or self.send_queue
                or self.logOctets
                or self.state != self.STATE_OPEN
            ):
                self._uncork()  # what this turn wrote goes first
                super().sendData(data, sync, chopsize)
                return
            self._write(data)
            self.trafficStats.outgoingOctetsWireLevel += len(data)

        def _write(self, data: bytes, cork: bool = False) -> None:
            """Write now, or with `cork` at the end of this turn of the event loop together
            with what else this turn writes to the socket (see Corks); behind anything already
            corked, in order. Only a socket written to directly is corked: through Twisted,
            frames are queued in order anyway (_send_now)."""
            corked = CORKS.frames.get(self)
            if corked is not None:
                corked.append(data)
            elif cork and _writes_directly(self.transport):
                CORKS.add(self, data)
            else:
                self._send_now(data)

        def _uncork(self) -> None:
            CORKS.send(self, CORKS.frames.pop(self, None))

        def _closeConnection(self, abort=False):  # autobahn's name
            try:
                self._uncork()  # a close frame, or anything before it, must not stay behind
            finally:
                super()._closeConnection(abort)

        def connectionLost(self, reason):  # Twisted's name
            CORKS.frames.pop(self, None)
            super().connectionLost(reason)

        def _send_now(self, data: bytes) -> None:
            """Write now if the socket takes it, as asyncio's transports do.

            Twisted's write() registers the fd for writability, writes on the next loop turn
            and unregisters it: two epoll_ctl calls and a callback per frame, the bulk of a
            broadcast's cost when done for each recipient.
            """
            transport = self.transport
            if _writes_directly(transport):
                try:
                    sent = transport.socket.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as error:
                    # As Twisted's own writeSomeData: no buffer space means "later", anything
                    # else means the connection is going, which Twisted will notice.
                    if error.errno != errno.ENOBUFS:
                        return
                    sent = 0
                if sent == len(data):
                    return
                data = data[sent:]
            transport.write(data)  # Twisted queues the rest, in order

        def serverSend(self, content, binary=False):
            if self.watch is not None:
                self.watch.written(len(content))
            if self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
                # Going away (just dropped as a slow reader, or closing): autobahn would raise
                # Disconnected into the application, which would then close with 1011.
                return
            # autobahn applies maxMessagePayloadSize, the limit on what a client may send
            # (1009), to the server's own messages as well: a long history page would raise
            # into the application. What we send is bounded by the application instead.
            # The limit normally lives on the class (_options_on_class): lift it on the socket
            # for this call only, and leave the socket's __dict__ as it was.
            own = vars(self).get("maxMessagePayloadSize")
            self.maxMessagePayloadSize = 0
            try:
                super().serverSend(content, binary)
            finally:
                if own is None:
                    del self.maxMessagePayloadSize
                else:
                    self.maxMessagePayloadSize = own

        def handle_reply(self, message):
            if message.get("type") == "websocket.close" and self.state != self.STATE_CONNECTING:
                code = message.get("code") or 1000
                if not 1000 <= code <= 4999 or code in (1004, 1005, 1006, 1015):
                    code = 1011  # never put a reserved or invalid code on the wire
                reason = (message.get("reason") or "").encode("utf-8")[:123]  # RFC 6455 limit
                reason = reason.decode("utf-8", "ignore").encode("utf-8") or None
                self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=False)
                return
            super().handle_reply(message)

    class ChatWebSocketFactory(ws_protocol.WebSocketFactory):
        chat_fixes = True
        protocol = ChatWebSocketProtocol

        def resetProtocolOptions(self):  # autobahn's name
            super().resetProtocolOptions()
            self.failByDrop = False
            self._options_on_class()

        def setProtocolOptions(self, *args, **kwargs):  # autobahn's name
            super().setProtocolOptions(*args, **kwargs)
            self._options_on_class()

        def _options_on_class(self):
            """autobahn copies its ~40 options from the factory into each connection's __dict__,
            unless the protocol's class has them: give them to a class made for this factory."""
            base = ChatWebSocketProtocol
            options = {
                # A function on a class would be bound to each socket (perMessageCompressionAccept
                # is one): the connection must call it as the factory holds it. staticmethod()
                # leaves any other callable as it is.
                name: staticmethod(value) if callable(value) else value
                for name in base.CONFIG_ATTRS
                if hasattr(self, name)
                for value in [getattr(self, name)]
            }
            self.protocol = type(base.__name__, (base,), options)

    # Twisted closes every socket at shutdown: what this turn corked goes out first.
    reactor.addSystemEventTrigger("before", "shutdown", CORKS.flush_now)
    # autobahn pretty-prints those options for a debug line at every connection, logging on or
    # off; format them only if the line is written.
    autobahn_protocol.pformat = _LazyPformat
    # Every frame a client sends is masked; autobahn makes a cffi masker object for each one.
    autobahn_protocol.create_xor_masker = partial(
        _create_xor_masker, autobahn_protocol.create_xor_masker
    )

    server.WebSocketFactory = ChatWebSocketFactory

    class ChatWebRequest(http_protocol.WebRequest):
        def __init__(self, *args, **kwargs):
            # Twisted >= 25.5's argument (an older Twisted refuses it rather than ignore it).
            super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

    class ChatHTTPFactory(http_protocol.HTTPFactory):
        def buildProtocol(self, addr):
            protocol = super().buildProtocol(addr)
            protocol.requestFactory = ChatWebRequest
            return protocol

    server.HTTPFactory = ChatHTTPFactory

    class ChatServer(server.Server):
        def kill_all_applications(self):
            """daphne's, skipping connections that have no application: a request still
            arriving, an upgraded request for up to a second (until daphne's checker reaps
            it). daphne read `details["application_instance"]`, and the KeyError made Twisted
            skip the rest of its shutdown triggers and drop every socket before the consumers
            could close them with 1001: clients of a restarted server saw 1006."""
            wait_for = []
            for details in self.connections.values():
                instance = details.get("application_instance")
                if instance is not None and not instance.done():
                    instance.cancel()
                    wait_for.append(instance)
            logger.info("Killed %i pending application instances", len(wait_for))
            waited = defer.Deferred.fromFuture(asyncio.gather(*wait_for))
            waited.addErrback(lambda _: None)
            return waited

        def create_application(self, protocol, scope):
            """daphne's, with an Inbox for its asyncio.Queue (see Inbox)."""
            assert "application_instance" not in self.connections[protocol]
            inbox = Inbox()
            scope.setdefault("asgi", {"version": "3.0"})
            application_instance = self.application(
                scope=scope, receive=inbox.get, send=partial(self.handle_reply, protocol)
            )
            if protocol not in self.connections:
                return None
            self.connections[protocol]["application_instance"] = asyncio.ensure_future(
                application_instance, loop=asyncio.get_event_loop()
            )
            return inbox

        def log_action(self, protocol, action, details):
            """daphne's access log (written to its stream as is, past the logging filters), with
            the path only, as the shipped proxies log $uri: a query string may carry a ticket."""
            path = details.get("path")
            if isinstance(path, str) and "?" in path:
                details = {**details, "path": path.split("?", 1)[0]}
            super().log_action(protocol, action, details)

    ChatWebSocketFactory.server_to_run = ChatServer
    return ChatServer


class Corks:
    """Sockets with frames corked in this turn of the event loop, sent to at its end.

    A batch's acks to one sender, or a room's several messages from one batch, reach a socket
    in the same turn: one send() for all of them instead of one per frame (a loopback send
    costs about as much as framing and writing the frame). A writer asks for it (`cork`): the
    consumer for every frame it writes (acks, errors, hello, history), the hub for a room's
    multi-message batches and gap fills; a lone message to each of a room's sockets goes at
    once, since keeping it costs more than it saves. Corked frames leave before the loop next
    waits for events, so no frame waits for another's arrival.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        # Socket -> its frames, in the order written. Kept here, not on the socket: an idle
        # socket's memory is a target (docs/performance.md).
        self.frames: dict[Any, list[bytes]] = {}

    def add(self, protocol, data: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop turn to wait for (a write at shutdown): now
            protocol._send_now(data)
            return
        if loop is not self.loop:  # first use, or a new loop (tests run several)
            self.flush_now()  # anything the earlier loop left, not dropped
            self.loop = loop
        if not self.frames:
            loop.call_soon(self.flush, loop)
        self.frames[protocol] = [data]

    def flush(self, loop) -> None:
        if loop is self.loop:  # else scheduled on an earlier loop, flushed when it changed
            self.flush_now()

    def flush_now(self) -> None:
        """Send everything corked. Also at shutdown, before Twisted closes the sockets."""
        # Sending runs no other socket's code, so nothing is corked meanwhile; if something
        # were, it would find the dict empty and schedule its own flush.
        frames, self.frames = self.frames, {}
        for protocol, chunks in frames.items():
            try:
                self.send(protocol, chunks)
            except Exception:
                # Frames lost on an open socket would leave its client with a silent gap:
                # close it, and the client reconnects and resumes from its last seq.
                logger.exception("writing to %s failed", getattr(protocol, "client_addr", "?"))
                with contextlib.suppress(Exception):
                    protocol.dropConnection(abort=True)

    @staticmethod
    def send(protocol, chunks: list[bytes] | None) -> None:
        """A socket's corked frames, in one write (joining one chunk copies nothing)."""
        if chunks:
            protocol._send_now(b"".join(chunks))


CORKS = Corks()


# Up to this many payload bytes, unmasking with Python's integers beats autobahn's cffi masker
# (1.3 against 4.3 µs at 100 bytes); past about 1.2 KB its SIMD loop wins.
SMALL_FRAME = 1024


def _create_xor_masker(autobahn_masker, mask: bytes, length: int | None = None):
    if length is not None and length <= SMALL_FRAME:
        return SmallFrameUnmasker(mask)
    return autobahn_masker(mask, length)


class SmallFrameUnmasker:
    """RFC 6455 unmasking of one frame's payload, which may arrive in several pieces: each byte
    is XORed with the mask byte at its offset in the payload, modulo 4. autobahn's interface."""

    __slots__ = ("_mask", "_offset")

    def __init__(self, mask: bytes) -> None:
        assert len(mask) == 4
        self._mask, self._offset = mask, 0

    def pointer(self) -> int:
        return self._offset

    def reset(self) -> None:
        self._offset = 0

    def process(self, data: bytes) -> bytes:
        size, turn = len(data), self._offset & 3
        self._offset += size
        key = (self._mask[turn:] + self._mask[:turn]) * (size // 4 + 1)
        return (int.from_bytes(data, "little") ^ int.from_bytes(key[:size], "little")).to_bytes(
            size, "little"
        )


class Inbox:
    """A connection's messages to its application: daphne's asyncio.Queue, in 200 bytes, not 3 KB.

    daphne gives every connection an asyncio.Queue, which allocates four deques (items, getters,
    putters, and its Event's waiters) of one 64-slot block each; an idle socket's largest single
    cost. Only put_nowait() (from daphne's protocol) and get() (the application's receive) are
    used, as here: unbounded, first in first out, and a cancelled get() loses nothing.
    """

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: list | None = None
        self._waiters: list[asyncio.Future] | None = None

    def put_nowait(self, item) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)
                break

    async def get(self):
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Woken and cancelled at once: hand the wake-up on, or an item could sit unread.
                if waiter.done() and not waiter.cancelled() and self._items:
                    self._wake_next(waiter)
                raise
            finally:
                self._waiters.remove(waiter)
                if not self._waiters:
                    self._waiters = None
        item = self._items.pop(0)
        if not self._items:
            self._items = None
        return item

    def _wake_next(self, woken: asyncio.Future) -> None:
        for waiter in self._waiters or ():
            if waiter is not woken and not waiter.done():
                waiter.set_result(None)
                return


# What autobahn (the http_*, websocket_protocols and websocket_extensions attributes, _wskey) and
# daphne (clean_headers, _raw_query_string) keep from a socket's opening handshake; see
# _forget_handshake().
HANDSHAKE_LEFTOVERS = (
    "http_request_data",
    "http_status_line",
    "http_headers",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "http_response_data",
    "websocket_protocols",
    "websocket_extensions",
    "_wskey",
    "clean_headers",
    "_raw_query_string",
)


class SendQueue(list):
    """autobahn's send_queue (append, popleft, len) without a deque's up-front block."""

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


class OpenedRequest:
    """What daphne reads of the handshake request once the socket is open: the path it logs."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


class _LazyPformat:
    def __init__(self, value) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return format(pprint.pformat(self.value), spec)

    __str__ = __repr__ = lambda self: pprint.pformat(self.value)


def _writes_directly(transport) -> bool:
    """A plain TCP transport with nothing queued: writing to its socket keeps frames in order.

    Only Twisted's own TCP connection qualifies. Under `-e ssl:...` the protocol's transport is
    a TLSMemoryBIOProtocol wrapped around a plain TCP connection, and a ProtocolWrapper hands
    every attribute it lacks (TLS, socket, dataBuffer) to the connection beneath: duck typing
    would see cleartext TCP there and put unencrypted bytes into the TLS stream.
    """
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS  # startTLS() on the connection itself
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    )


def freeze_startup_heap(application_module: str) -> None:
    """Collect what starting up left, and exempt the rest from the cyclic garbage collector
    (`gc.freeze`). Call just before serving.

    Django, DRF, Twisted and the application leave about 200,000 objects that live as long as
    the process. Each of the collector's full passes walked them all: on the bench host, nine
    passes of 79 ms in a run of 6,000 handshakes, 6% of the server's CPU and a 79 ms stall of
    every socket each time. Frozen, they are never walked again; a full pass walks only what
    was made since (docs/performance.md). What starting up left as garbage is collected first:
    a frozen object in a cycle is never freed.

    The application's module is imported first. The system checks that `manage.py serve` runs
    have imported it already; with `--skip-checks` they have not, and daphne would import it
    after the freeze.
    """
    importlib.import_module(application_module)
    gc.collect()
    gc.freeze()


def finish_event_loop() -> None:
    """Run after daphne's reactor stops: end every task, write what is queued, close.

    daphne cancels the application instances at shutdown but stops waiting when the first one
    ends, so others can be left suspended; at interpreter exit CPython 3.11 then finalizes them
    and can crash (SIGSEGV formatting a Future's repr). Ending them here also runs each
    socket's cleanup, so its audit record is complete. A task still running after
    SHUTDOWN_CANCEL_WITHIN is left (and logged), that risk included: waiting on it for ever
    would leave the queued audit rows to systemd's SIGKILL.
    """
    from chat import writer
    from chat.audit import WRITE_TASK_NAME
    from chat.runtime import cancel_and_wait, shutdown_runtime

    loop = asyncio.get_event_loop_policy().get_event_loop()
    if loop.is_closed():
        return
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    # Writes in flight are waited for, not cancelled. An audit write's rows are either written
    # or kept, and then spooled if the database is down (chat/spool.py). The message writer's
    # batch commits whatever happens to its caller (the database thread runs a started call
    # to its end): cancelled, it left that batch unanswered and unpublished (other processes'
    # sockets never saw it live) and the batches queued behind it unwritten.
    finishing = (WRITE_TASK_NAME, writer.TASK_NAME)
    writes = [task for task in pending if task.get_name() in finishing]
    others = [task for task in pending if task.get_name() not in finishing]
    for task in others:
        # Now, before the loop runs anything queued: a socket's disconnect event reaching it
        # first would record 1006, not 1001.
        task.cancel()
    if others:
        loop.run_until_complete(
            cancel_and_wait(others, within=SHUTDOWN_CANCEL_WITHIN, grace=SHUTDOWN_CANCEL_GRACE)
        )
    if writes:
        loop.run_until_complete(asyncio.gather(*writes, return_exceptions=True))
    loop.run_until_complete(shutdown_runtime())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
