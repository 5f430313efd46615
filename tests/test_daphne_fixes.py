"""chatproject/server.py's direct socket write is taken only where it cannot corrupt the stream."""

import socket

import pytest
from twisted.internet import protocol, reactor, ssl, tcp
from twisted.protocols.tls import TLSMemoryBIOFactory

from chatproject.server import _writes_directly


@pytest.fixture
def tcp_server():
    """Twisted's server-side TCP connection over one end of a socket pair, for `app`."""
    made = []

    def make(app: protocol.Protocol) -> tcp.Server:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        transport = tcp.Server(ours, app, ("127.0.0.1", 1), None, 1, reactor)
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
