"""The client's IP address: the socket peer, or what trusted proxies say it is."""

import ipaddress
from functools import lru_cache

from django.conf import settings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_network(entry: str) -> IPNetwork:
    """A CHAT_TRUSTED_PROXIES entry as a network (ValueError if it names none). An IPv4-mapped
    one ("::ffff:127.0.0.1", as a dual-stack server shows an IPv4 peer) is the IPv4 network it
    names: peers are compared as IPv4 addresses (_parse)."""
    network = ipaddress.ip_network(entry.strip(), strict=False)
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None and network.prefixlen >= 96:
        return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


@lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(proxy_network(p) for p in proxies if p.strip())


def _parse(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[2001:db8::1]:443"
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # "203.0.113.9:51234"
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # An IPv4-mapped IPv6 peer ("::ffff:10.0.0.1") is that IPv4 address.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_trusted_proxy(peer: str | None, proxies: list[str]) -> bool:
    hop = _parse(peer) if peer else None
    return hop is not None and any(hop in network for network in _networks(tuple(proxies)))


def resolve_client_ip(peer: str | None, forwarded_for: str | None) -> str | None:
    """Return the client IP for a connection from `peer` carrying `forwarded_for`.

    X-Forwarded-For is read right to left and believed only while the hop that wrote the entry
    is a trusted proxy: the answer is the right-most address that no trusted proxy vouches for.
    A client can prepend whatever it likes, but never get past the first untrusted hop.
    """
    hop = _parse(peer) if peer else None
    if hop is None:
        return None
    trusted = _networks(tuple(settings.CHAT_TRUSTED_PROXIES))
    if not trusted or not forwarded_for:
        return str(hop)
    for entry in reversed(forwarded_for.split(",")):
        if not any(hop in network for network in trusted):
            break
        previous = _parse(entry)
        if previous is None:
            break
        hop = previous
    return str(hop)


# The per-address limits (sign-in, the anonymous API, connection attempts) count an IPv6 client
# by its /64: a provider gives each subscriber at least that network (RFC 6177), any of whose
# 2**64 addresses the subscriber may use, a new one for every request.
LIMIT_PREFIX_V6 = 64


@lru_cache(maxsize=4096)  # on every handshake: ipaddress's network took 10-80 µs a call
def limit_key(ip: str | None) -> str | None:
    """Who `ip` (as resolve_client_ip gives it) is to the per-address limits: the IPv4 address
    itself, or the /64 network of an IPv6 address. A ticket stays bound to the whole address."""
    if ip is None or ":" not in ip:
        return ip  # resolve_client_ip writes IPv4 (an IPv4-mapped peer too) in dotted form
    host_bits = 128 - LIMIT_PREFIX_V6
    network = ipaddress.IPv6Address(int(ipaddress.IPv6Address(ip)) >> host_bits << host_bits)
    return f"{network}/{LIMIT_PREFIX_V6}"


def client_ip_from_request(request) -> str | None:
    return resolve_client_ip(
        request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR")
    )


def client_ip_from_scope(scope) -> str | None:
    client = scope.get("client")
    forwarded = None
    for name, value in scope.get("headers", []):
        if name == b"x-forwarded-for":
            # Several X-Forwarded-For headers are one list, in order (RFC 7230 3.2.2).
            text = value.decode("latin1")
            forwarded = f"{forwarded},{text}" if forwarded else text
    return resolve_client_ip(client[0] if client else None, forwarded)
