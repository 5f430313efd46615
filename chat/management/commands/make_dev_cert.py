"""Create a self-signed TLS certificate and key for local wss:// and the proxy configurations."""

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
# Browsers refuse leaf certificates valid for more than 398 days.
MAX_DAYS = 397
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
# One label of a host name: letters, digits and inner hyphens, 63 characters at most.
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _general_name(name: str) -> x509.GeneralName | None:
    """`name` as a SubjectAlternativeName entry (IP address or DNS name); None if it is neither."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return None
    return x509.DNSName(name)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write a fresh file created with `mode`, then rename it: the key is never briefly readable."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


class Command(BaseCommand):
    help = (
        "Create a self-signed development certificate (EC P-256) for localhost, 127.0.0.1 and "
        "::1: <out-dir>/cert.pem and <out-dir>/key.pem (mode 0600). Never for production."
    )
    # A certificate does not depend on the app's configuration: it must be possible to make one
    # before that configuration passes the checks (e.g. before CHAT_ALLOWED_ORIGINS is set).
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument(
            "--out-dir",
            type=Path,
            help="directory for cert.pem and key.pem (default: CHAT_DATA_DIR/tls, i.e. var/tls)",
        )
        parser.add_argument(
            "--days", type=int, default=30, help=f"validity in days, 1 to {MAX_DAYS} (default 30)"
        )
        parser.add_argument(
            "--name",
            action="append",
            default=[],
            dest="names",
            help="extra host name or IP address for the certificate; repeatable",
        )
        parser.add_argument("--force", action="store_true", help="replace an existing cert/key")

    def handle(self, *args, **options):
        days = options["days"]
        if not 1 <= days <= MAX_DAYS:
            raise CommandError(f"--days must be between 1 and {MAX_DAYS}, not {days}")
        names = list(dict.fromkeys([*DEFAULT_NAMES, *options["names"]]))
        entries = {name: _general_name(name) for name in names}
        invalid = [name for name, entry in entries.items() if entry is None]
        if invalid:
            raise CommandError(f"not a host name or IP address: {', '.join(invalid)}")

        out_dir = options["out_dir"] or Path(settings.DATA_DIR) / "tls"
        if out_dir.exists() and not out_dir.is_dir():
            raise CommandError(f"--out-dir {out_dir} exists and is not a directory")
        cert_path, key_path = out_dir / CERT_NAME, out_dir / KEY_NAME
        existing = [str(p) for p in (cert_path, key_path) if p.exists()]
        if existing and not options["force"]:
            raise CommandError(f"refusing to overwrite {', '.join(existing)} (use --force)")

        key = ec.generate_private_key(ec.SECP256R1())
        now = timezone.now()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chat development certificate"),
            ]
        )
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            # A minute of slack for clocks that differ a little between client and server.
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(list(entries.values())), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
            )
            .sign(key, hashes.SHA256())
        )

        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_file(
                key_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                0o600,
            )
            _write_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as error:
            raise CommandError(f"cannot write to {out_dir}: {error}") from error

        fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":").upper()
        self.stdout.write(f"Certificate: {cert_path}")
        self.stdout.write(f"Private key: {key_path} (mode 0600)")
        self.stdout.write(f"Names:       {', '.join(names)}")
        self.stdout.write(f"Expires:     {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        self.stdout.write(f"SHA-256:     {fingerprint}")
        self.stdout.write("Self-signed, for development only: trust it explicitly in clients.")
