"""The protocol's exceptions: every decoder turns bad bytes into one of these, never a crash.

Each class carries a short machine-readable `code` so callers can count or report failures
without matching on message text.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class for every failure of the wire layer."""

    code: str = "protocol_error"


class DecodeError(ProtocolError):
    """The bytes are not a well-formed message (bad msgpack, wrong types, missing fields)."""

    code = "malformed"


class FrameTooLarge(ProtocolError):
    """A frame, ad or tensor exceeds its size limit."""

    code = "too_large"


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol major version we do not."""

    code = "version"


class BadSignature(ProtocolError):
    """A signature does not verify, or the signing key does not own the claimed peer id."""

    code = "bad_signature"


class AdRejected(ProtocolError):
    """A capacity ad was dropped; `reason` is one of `protocol.ads.AD_REJECT_REASONS`."""

    code = "ad_rejected"

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(
            f"ad rejected ({reason}): {message}" if message else f"ad rejected ({reason})"
        )
        self.reason = reason
