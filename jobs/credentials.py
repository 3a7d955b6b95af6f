"""Credential hygiene, pure: S3 keys checked as they are read, and key material kept out of any text that
may reach a log, an event or a status.

`clean_key`: a key as it was meant. `kubectl create secret --from-file` of an echoed file leaves a trailing
newline; put into a request header it makes the HTTP library quote the whole signed header in its error.

An HTTP library's error can quote a whole request header: a key with a trailing newline makes botocore's
HTTP client raise "Invalid header value b'AWS4-HMAC-SHA256 Credential=<access key id>/...,
Signature=...'". `redact` removes what a signed S3 request carries (the Credential and Signature of SigV4
and SigV2, presigned-URL parameters, security tokens, Authorization header values) and any exact value
the caller knows to be secret. Used by jobs.store (its client factory and error messages) and the operator
(its Secret checks and its logging).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[REDACTED]"

_PATTERNS = [
    # SigV4 header fields and presigned-URL parameters: Credential=AKIA.../date/region/s3/aws4_request
    re.compile(r"(?i)((?:X-Amz-)?Credential=)[^\s,&'\"]+"),
    re.compile(r"(?i)((?:X-Amz-)?Signature=)[^\s,&'\"]+"),
    re.compile(r"(?i)((?:X-Amz-)?Security-Token['\"]?\s*[:=]\s*['\"]?)[^\s,&'\"]+"),
    # SigV2 (`AWS <key id>:<signature>`) and any other Authorization header value
    re.compile(r"(?i)(\bAWS )[A-Za-z0-9+/=]{8,}:[A-Za-z0-9+/=]+"),
    re.compile(r"(?i)(Authorization['\"]?\s*[:=]\s*b?['\"]?)[^'\"\n]+"),
]


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` without credential material: the known `secrets` (and their whitespace-stripped forms) and
    whatever looks like a signed request's credentials."""
    known = {v for s in secrets if s for v in (s, s.strip()) if len(v) >= 4}
    for value in sorted(known, key=len, reverse=True):
        text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return text


class CredentialsError(ValueError):
    """A key that cannot be used as it is; the message names the key, never its value."""


def clean_key(value: str, what: str) -> str:
    """`value` without surrounding whitespace; CredentialsError (naming `what`, not the value) when it is
    empty or has whitespace or control characters inside."""
    key = value.strip()
    if not key:
        raise CredentialsError(f"{what} is empty; set it to the key alone")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise CredentialsError(f"{what} contains whitespace or control characters; set it to the key alone")
    return key
