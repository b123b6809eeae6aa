"""The one error taxonomy of the mesh.

Rules of this module:

* Every error that crosses a process boundary carries an `ErrorCode`. Codes are stable
  wire values: never renumber one, only add.
* Codes fall in the seed's three categories by their thousands digit: 1xxx protocol,
  2xxx security, 3xxx system.
* Each code has exactly one `MeshError` subclass; the class says whether a retry with
  the same command id can help.
* `NEVER_STARTED` names the codes that prove a command never ran: a client resends
  those with the same id by itself, and nobody may remember them as the command's answer.
* `error_from_wire()` turns a code received from a peer back into the right exception;
  an unknown code (from a newer peer) still becomes a `MeshError` carrying the int.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any, Final

__all__ = [
    "Category",
    "category_of",
    "ErrorCode",
    "NEVER_STARTED",
    "MeshError",
    "ProtocolError",
    "SecurityError",
    "MeshSystemError",
    "BadFormatError",
    "UnsupportedVersionError",
    "ValidationFailedError",
    "HandlerNotFoundError",
    "InvalidStateError",
    "MessageTooLargeError",
    "AuthenticationFailedError",
    "TokenExpiredError",
    "AccessDeniedError",
    "EncryptionFailedError",
    "SignatureInvalidError",
    "TokenRevokedError",
    "ReplayDetectedError",
    "SecurityLevelTooLowError",
    "ResourceExhaustedError",
    "ConfigurationError",
    "NetworkError",
    "InternalError",
    "DeadlineExceededError",
    "NodeLostError",
    "UnavailableError",
    "CorruptStateError",
    "NotLeaderError",
    "CancelledError",
    "error_class",
    "error_from_wire",
]


class Category(StrEnum):
    """The seed's three error categories, as the strings used in docs and logs."""

    PROTOCOL = "protocol"
    SECURITY = "security"
    SYSTEM = "system"


class ErrorCode(IntEnum):
    """Stable numeric wire codes; the thousands digit is the category."""

    BAD_FORMAT = 1000
    UNSUPPORTED_VERSION = 1001
    VALIDATION_FAILED = 1002
    HANDLER_NOT_FOUND = 1003
    INVALID_STATE = 1004
    MESSAGE_TOO_LARGE = 1005

    AUTHENTICATION_FAILED = 2000
    TOKEN_EXPIRED = 2001
    ACCESS_DENIED = 2002
    ENCRYPTION_FAILED = 2003
    SIGNATURE_INVALID = 2004
    TOKEN_REVOKED = 2005
    REPLAY_DETECTED = 2006
    SECURITY_LEVEL_TOO_LOW = 2007

    RESOURCE_EXHAUSTED = 3000
    CONFIGURATION = 3001
    NETWORK = 3002
    INTERNAL = 3003
    DEADLINE_EXCEEDED = 3004
    NODE_LOST = 3005
    UNAVAILABLE = 3006
    CORRUPT_STATE = 3007
    NOT_LEADER = 3008
    CANCELLED = 3009

    @property
    def category(self) -> Category:
        return category_of(int(self))


# The codes that prove a command never started, so resending it cannot run it twice: the
# client retries them by itself (`mesh.client.AUTO_RETRY`), and neither the broker nor the
# cluster keeps them as a command's answer (that would turn every retry into the refusal).
NEVER_STARTED: Final = frozenset({ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.UNAVAILABLE})


def category_of(code: int) -> Category:
    """Category of any code, including codes this version does not know."""
    return {1: Category.PROTOCOL, 2: Category.SECURITY, 3: Category.SYSTEM}.get(
        code // 1000, Category.SYSTEM
    )


class MeshError(Exception):
    """Base of every mesh error; `code` and `retryable` travel on the wire.

    Args:
        message: a sentence for a person; never contains secrets or payloads.
        details: small, JSON-friendly facts (a field name, a limit) for programs.
        code: only for codes this version does not know (see `error_from_wire`).
    """

    code: int = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(
        self, message: str = "", *, details: dict[str, Any] | None = None, code: int | None = None
    ) -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__
        self.details = dict(details or {})
        if code is not None:
            self.code = code

    @property
    def category(self) -> Category:
        return category_of(int(self.code))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={int(self.code)}, message={self.message!r})"


class ProtocolError(MeshError):
    """The message broke the protocol; sending it again unchanged will fail again."""


class SecurityError(MeshError):
    """Identity, permission or cryptography refused the message."""


class MeshSystemError(MeshError):
    """The mesh could not do the work right now (capacity, network, a failing part)."""


class BadFormatError(ProtocolError):
    code = ErrorCode.BAD_FORMAT


class UnsupportedVersionError(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION


class ValidationFailedError(ProtocolError):
    code = ErrorCode.VALIDATION_FAILED


class HandlerNotFoundError(ProtocolError):
    code = ErrorCode.HANDLER_NOT_FOUND


class InvalidStateError(ProtocolError):
    code = ErrorCode.INVALID_STATE


class MessageTooLargeError(ProtocolError):
    code = ErrorCode.MESSAGE_TOO_LARGE


class AuthenticationFailedError(SecurityError):
    code = ErrorCode.AUTHENTICATION_FAILED


class TokenExpiredError(SecurityError):
    code = ErrorCode.TOKEN_EXPIRED


class AccessDeniedError(SecurityError):
    code = ErrorCode.ACCESS_DENIED


class EncryptionFailedError(SecurityError):
    code = ErrorCode.ENCRYPTION_FAILED


class SignatureInvalidError(SecurityError):
    code = ErrorCode.SIGNATURE_INVALID


class TokenRevokedError(SecurityError):
    code = ErrorCode.TOKEN_REVOKED


class ReplayDetectedError(SecurityError):
    code = ErrorCode.REPLAY_DETECTED


class SecurityLevelTooLowError(SecurityError):
    code = ErrorCode.SECURITY_LEVEL_TOO_LOW


class ResourceExhaustedError(MeshSystemError):
    code = ErrorCode.RESOURCE_EXHAUSTED
    retryable = True


class ConfigurationError(MeshSystemError):
    code = ErrorCode.CONFIGURATION


class NetworkError(MeshSystemError):
    code = ErrorCode.NETWORK
    retryable = True


class InternalError(MeshSystemError):
    code = ErrorCode.INTERNAL


class DeadlineExceededError(MeshSystemError):
    code = ErrorCode.DEADLINE_EXCEEDED
    retryable = True


class NodeLostError(MeshSystemError):
    code = ErrorCode.NODE_LOST
    retryable = True


class UnavailableError(MeshSystemError):
    code = ErrorCode.UNAVAILABLE
    retryable = True


class CorruptStateError(MeshSystemError):
    """Durable state failed its integrity checks; only an operator can repair it."""

    code = ErrorCode.CORRUPT_STATE


class NotLeaderError(MeshSystemError):
    """This broker is not the cluster leader; `details["leader"]` names it when known."""

    code = ErrorCode.NOT_LEADER
    retryable = True
class CancelledError(MeshSystemError):
    """The caller cancelled the command; it may have run in part (so not retried by itself)."""

    code = ErrorCode.CANCELLED


_BY_CODE: dict[int, type[MeshError]] = {
    int(cls.code): cls
    for cls in (
        BadFormatError,
        UnsupportedVersionError,
        ValidationFailedError,
        HandlerNotFoundError,
        InvalidStateError,
        MessageTooLargeError,
        AuthenticationFailedError,
        TokenExpiredError,
        AccessDeniedError,
        EncryptionFailedError,
        SignatureInvalidError,
        TokenRevokedError,
        ReplayDetectedError,
        SecurityLevelTooLowError,
        ResourceExhaustedError,
        ConfigurationError,
        NetworkError,
        InternalError,
        DeadlineExceededError,
        NodeLostError,
        UnavailableError,
        CorruptStateError,
        NotLeaderError,
        CancelledError,
    )
}


def error_class(code: int) -> type[MeshError]:
    """The exception class for a wire code (`MeshError` itself when unknown)."""
    return _BY_CODE.get(int(code), MeshError)


def error_from_wire(
    code: int, message: str, retryable: bool, details: dict[str, Any] | None = None
) -> MeshError:
    """Rebuild the exception a peer reported; unknown codes keep their number."""
    cls = _BY_CODE.get(int(code))
    if cls is None:
        err = MeshError(message, details=details, code=int(code))
        err.retryable = bool(retryable)
        return err
    return cls(message, details=details)
