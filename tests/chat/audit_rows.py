"""Audit rows for tests, written through the real writer (chat.audit.append), and a sample chain."""

import uuid
from dataclasses import dataclass

from django.utils import timezone

from chat import audit, services
from chat.models import ConnectionLog
from tests.factories import make_user


def log_connection(
    *,
    user=None,
    room=None,
    outcome: str = audit.Outcome.ACCEPTED,
    reason: str = "",
    ip: str | None = "203.0.113.7",
    jti: str = "",
    opened_at=None,
    **fields,
) -> ConnectionLog:
    """One connection attempt, as ConnectionAudit.decide() records it."""
    row = ConnectionLog(
        id=uuid.uuid4(),
        jti=jti,
        user_id=getattr(user, "pk", None),
        username=getattr(user, "username", ""),
        room_id=getattr(room, "pk", None),
        room_slug=getattr(room, "slug", ""),
        ip=ip,
        origin="http://testserver",
        user_agent=fields.pop("user_agent", "pytest"),
        transport=audit.Transport.SUBPROTOCOL,
        outcome=outcome,
        reason=reason,
        opened_at=opened_at or timezone.now(),
        instance="test:1",
        **fields,
    )
    audit.append([row])
    return row


def log_close(connection: ConnectionLog, *, code: int = 1000, closed_at=None) -> None:
    """The close of `connection`, as ConnectionAudit.close() records it."""
    audit.append([audit.ConnectionClose(connection.id, closed_at or timezone.now(), code, 2, 5)])


@dataclass
class SampleChain:
    owner: object
    alice: object
    room: object
    connection: ConnectionLog
    rejected: ConnectionLog


def build_chain(prefix: str = "") -> SampleChain:
    """Nine links of every kind, written by the services and the writer, in this order:

    1 room created, 2 member added, 3 connection opened, 4-5 messages sent, 6 connection closed,
    7 message deleted, 8 connection rejected, 9 login failed.
    """
    owner = make_user(f"{prefix}owner")
    alice = make_user(f"{prefix}alice")
    room = services.room_create(actor=owner, slug=f"{prefix}lobby", title="Lobby")
    services.room_join(user=alice, room=room)
    connection = log_connection(user=alice, room=room, ip="198.51.100.10")
    for client_id in ("m1", "m2"):
        services.message_send(
            room=room,
            author=alice,
            body="hello",
            client_id=client_id,
            connection_id=connection.id,
            ip="198.51.100.10",
        )
    log_close(connection)
    services.message_delete(actor=owner, room=room, seq=1)
    rejected = log_connection(
        outcome=audit.Outcome.REJECTED, reason=audit.Reason.TICKET_EXPIRED, ip="192.0.2.99"
    )
    audit.security_event(
        event=audit.Event.LOGIN_FAILED, target=alice, ip="192.0.2.99", reason="bad credentials"
    )
    connection.refresh_from_db()
    return SampleChain(owner, alice, room, connection, rejected)
