"""wss:// end to end (daphne terminating TLS itself) and the certificate `make_dev_cert` makes."""

import asyncio
import io
import json
import ssl
from datetime import timedelta
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
import websockets
from asgiref.sync import sync_to_async
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from django.core.management import CommandError, call_command

from tests.e2e.server import DaphneServer, free_port
from tests.factories import PASSWORD, make_room, make_user


def make_dev_cert(out_dir: Path, *args: str) -> tuple[Path, Path]:
    call_command("make_dev_cert", "--out-dir", str(out_dir), *args, stdout=io.StringIO())
    return out_dir / "cert.pem", out_dir / "key.pem"


@pytest.fixture
def dev_cert(tmp_path) -> tuple[Path, Path]:
    return make_dev_cert(tmp_path / "tls")


@pytest.fixture
def tls_daphne(server_factory, dev_cert) -> DaphneServer:
    """`manage.py serve --endpoint ssl:...` with production HTTPS settings."""
    cert, key = dev_cert
    port = free_port()
    endpoint = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    return server_factory(
        port=port, extra_args=["--endpoint", endpoint], scheme="https", DJANGO_HTTPS="1"
    )


async def _ticket(server: DaphneServer, context: ssl.SSLContext, username: str) -> dict:
    async with httpx.AsyncClient(base_url=server.url, verify=context) as http:
        login = await http.post(
            "/api/auth/token/", json={"username": username, "password": PASSWORD}
        )
        assert login.status_code == 200
        # Django saw a secure request: daphne's TLS gives the ASGI scope the https scheme.
        assert login.headers["strict-transport-security"].startswith("max-age=31536000")
        auth = {"Authorization": f"Bearer {login.json()['access']}"}
        response = await http.post("/api/tickets/", json={"room": "lobby"}, headers=auth)
        assert response.status_code == 201
        return response.json()


async def _connect(server: DaphneServer, context: ssl.SSLContext, username: str):
    ticket = await _ticket(server, context, username)
    ws = await websockets.connect(
        server.ws_url(ticket["ws_url"]),
        ssl=context,
        subprotocols=["chat.v1", f"ticket.{ticket['ticket']}"],
        origin=server.origin,
    )
    hello = json.loads(await ws.recv())
    assert (hello["type"], hello["room"], hello["user"]) == ("hello", "lobby", username)
    return ws


async def _recv_chat(ws, count: int) -> list[dict]:
    """The next `count` frames that are not presence notices (who joined is not the point)."""
    frames = []
    while len(frames) < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if frame["type"] != "presence":
            frames.append(frame)
    return frames


@pytest.mark.e2e
async def test_chat_over_wss_with_trusted_dev_certificate(tls_daphne, dev_cert):
    cert, _ = dev_cert
    trusted = ssl.create_default_context(cafile=cert)
    await sync_to_async(lambda: (make_user("alice"), make_user("bob"), make_room("lobby")))()
    alice = await _connect(tls_daphne, trusted, "alice")
    bob = await _connect(tls_daphne, trusted, "bob")
    try:
        tls = alice.transport.get_extra_info("ssl_object")
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        served = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
        assert tls.getpeercert(binary_form=True) == served

        for n in range(3):
            await alice.send(
                json.dumps({"type": "message", "body": f"over tls {n}", "client_id": f"c{n}"})
            )
            frames = {frame["type"]: frame for frame in await _recv_chat(alice, 2)}
            assert set(frames) == {"ack", "message"}
            seq = frames["message"]["seq"]
            assert frames["ack"] == {"type": "ack", "client_id": f"c{n}", "seq": seq}
            assert (frames["message"]["body"], frames["message"]["author"]) == (
                f"over tls {n}",
                "alice",
            )
            # The other recipient's socket is idle when the broadcast comes: the fan-out writes
            # straight to it, and that write must go through TLS (a cleartext frame here once
            # broke the stream with SSL WRONG_VERSION_NUMBER).
            [received] = await _recv_chat(bob, 1)
            assert (received["type"], received["seq"], received["body"]) == (
                "message",
                seq,
                f"over tls {n}",
            )
    finally:
        await alice.close()
        await bob.close()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("trust_dev_cert", "server_hostname"),
    [
        pytest.param(False, None, id="self-signed-not-trusted"),
        pytest.param(True, "chat.example.com", id="trusted-but-other-host-name"),
    ],
)
async def test_wss_handshake_fails_without_verifiable_certificate(
    tls_daphne, dev_cert, trust_dev_cert, server_hostname
):
    cert, _ = dev_cert
    context = ssl.create_default_context(cafile=cert if trust_dev_cert else None)
    with pytest.raises(ssl.SSLCertVerificationError):
        async with websockets.connect(
            tls_daphne.ws_url("/ws/rooms/lobby/"),
            ssl=context,
            server_hostname=server_hostname,
            origin=tls_daphne.origin,
            open_timeout=5,
        ):
            pass


# ---------------------------------------------------------------------------------------------
# The certificate itself (no server needed)
# ---------------------------------------------------------------------------------------------


def test_dev_cert_names_localhost_and_loopback_for_thirty_days(dev_cert):
    cert, key = dev_cert
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ip_address("127.0.0.1"),
        ip_address("::1"),
    }
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=2)
    assert key.stat().st_mode & 0o777 == 0o600


def test_dev_cert_refuses_to_overwrite_without_force(dev_cert):
    cert, key = dev_cert
    before = cert.read_bytes(), key.read_bytes()
    with pytest.raises(CommandError, match="--force"):
        make_dev_cert(cert.parent)
    assert (cert.read_bytes(), key.read_bytes()) == before
    make_dev_cert(cert.parent, "--force")
    assert cert.read_bytes() != before[0]
    assert key.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--days", "0"], id="no-validity"),
        pytest.param(["--days", "398"], id="longer-than-browsers-accept"),
        pytest.param(["--name", "bad name"], id="not-a-host-name"),
        pytest.param(["--name", "-leading.example"], id="label-starts-with-hyphen"),
    ],
)
def test_dev_cert_rejects_bad_arguments(tmp_path, args):
    with pytest.raises(CommandError):
        make_dev_cert(tmp_path / "tls", *args)
    assert not (tmp_path / "tls").exists()


def test_dev_cert_out_dir_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CommandError, match="not a directory"):
        make_dev_cert(tmp_path / "file")
