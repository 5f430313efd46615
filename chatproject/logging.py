"""A logging filter that scrubs credentials from every record before any handler writes it."""

import logging
import re

# Our code never logs credentials; this is the net under third-party libraries and tracebacks.
# A value after "name=" or "name: ": quoted, up to its closing quote (a passphrase has spaces, a
# password any punctuation), else (a bare value, or a quote cut off) up to the next separator.
_VALUE = r"""(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|['"]?[^\s&'",;}]+)"""
_PATTERNS = [
    # JWTs (tickets, access and refresh tokens): three base64url segments, header starting "eyJ".
    (re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]{4,}"), "[redacted-jwt]"),
    # Ticket in a query string or in the Sec-WebSocket-Protocol header.
    (re.compile(r"(ticket[=.])[^\s&\"',;]+", re.IGNORECASE), r"\1[redacted]"),
    # Authorization headers.
    (re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE), r"\1[redacted]"),
    # Session and CSRF cookies: in a Cookie header, and in a dict of cookies.
    (
        re.compile(r"((?:sessionid|csrftoken)['\"]?\s*[:=]\s*)" + _VALUE, re.IGNORECASE),
        r"\1[redacted]",
    ),
    # password=... in form bodies, "password": ... in JSON and dict reprs.
    (re.compile(r"(password\d?['\"]?\s*[:=]\s*)" + _VALUE, re.IGNORECASE), r"\1[redacted]"),
]


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
