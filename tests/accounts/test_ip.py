import pytest

from accounts.ip import client_ip_from_scope, limit_key, resolve_client_ip


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        # No trusted proxies: the peer, whatever the header says.
        ("203.0.113.7", "1.2.3.4", [], "203.0.113.7"),
        # Untrusted peer with a forged header: still the peer.
        ("203.0.113.7", "1.2.3.4", ["127.0.0.1"], "203.0.113.7"),
        # Trusted proxy: the entry it appended.
        ("127.0.0.1", "198.51.100.9", ["127.0.0.1"], "198.51.100.9"),
        # A client-forged entry before the real one is ignored: right-most untrusted wins.
        ("127.0.0.1", "1.2.3.4, 198.51.100.9", ["127.0.0.1"], "198.51.100.9"),
        # Two trusted hops (CIDR): skip both.
        ("10.0.0.2", "198.51.100.9, 10.0.0.1", ["10.0.0.0/8"], "198.51.100.9"),
        # Everything trusted: the left-most address.
        ("10.0.0.2", "10.0.0.3", ["10.0.0.0/8"], "10.0.0.3"),
        # Garbage appended by a trusted proxy: stop at the proxy.
        ("127.0.0.1", "not-an-ip", ["127.0.0.1"], "127.0.0.1"),
        # Ports and brackets are stripped.
        ("127.0.0.1", "198.51.100.9:4431", ["127.0.0.1"], "198.51.100.9"),
        ("127.0.0.1", "[2001:db8::1]:443", ["127.0.0.1"], "2001:db8::1"),
        # IPv6 peers, and IPv4-mapped peers are their IPv4 address.
        ("2001:DB8::7", None, [], "2001:db8::7"),
        ("::ffff:192.0.2.1", None, [], "192.0.2.1"),
        # A proxy named as a dual-stack server shows it (IPv4-mapped) is that IPv4 proxy: it
        # was never trusted, and every client became the proxy's own (loopback) address.
        ("::ffff:127.0.0.1", "198.51.100.9", ["::ffff:127.0.0.1"], "198.51.100.9"),
        ("127.0.0.1", "198.51.100.9", ["::ffff:127.0.0.1"], "198.51.100.9"),
        ("10.0.0.2", "198.51.100.9", ["::ffff:10.0.0.0/104"], "198.51.100.9"),
    ],
)
def test_resolve_client_ip(settings, peer, forwarded, trusted, expected):
    settings.CHAT_TRUSTED_PROXIES = trusted
    assert resolve_client_ip(peer, forwarded) == expected


def test_resolve_client_ip_without_peer_is_unknown(settings):
    settings.CHAT_TRUSTED_PROXIES = ["127.0.0.1"]
    assert resolve_client_ip(None, "1.2.3.4") is None


def test_scope_joins_repeated_forwarded_headers(settings):
    settings.CHAT_TRUSTED_PROXIES = ["127.0.0.1"]
    scope = {
        "client": ["127.0.0.1", 5000],
        "headers": [(b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-for", b"198.51.100.9")],
    }
    assert client_ip_from_scope(scope) == "198.51.100.9"


@pytest.mark.parametrize(
    ("peer", "trusted", "secure"),
    [
        ("127.0.0.1", ["127.0.0.1"], True),
        ("203.0.113.9", ["127.0.0.1"], False),
        ("127.0.0.1", [], False),
    ],
)
def test_forwarded_proto_is_believed_only_from_trusted_proxies(settings, rf, peer, trusted, secure):
    from chatproject.middleware import UntrustedProxyHeadersMiddleware

    settings.CHAT_TRUSTED_PROXIES = trusted
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    request = rf.get(
        "/", REMOTE_ADDR=peer, HTTP_X_FORWARDED_PROTO="https", HTTP_X_FORWARDED_HOST="evil"
    )
    seen = {}
    UntrustedProxyHeadersMiddleware(lambda r: seen.update(secure=r.is_secure(), meta=dict(r.META)))(
        request
    )
    assert seen["secure"] is secure
    assert ("HTTP_X_FORWARDED_HOST" in seen["meta"]) is secure


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        # Any address of one IPv6 /64 (a subscriber's, all of it theirs to pick from) is one.
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:ffff:ffff:ffff", "2001:db8::/64"),
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, None),
    ],
)
def test_limit_key_is_the_ipv4_address_or_the_ipv6_network(ip, key):
    assert limit_key(ip) == key
