"""The error taxonomy: stable wire codes, categories, one class per code, retryable flags, error_from_wire."""

from __future__ import annotations

import pytest

from mesh.protocol import (
    NEVER_STARTED,
    AccessDeniedError,
    AuthenticationFailedError,
    BadFormatError,
    CancelledError,
    Category,
    ConfigurationError,
    CorruptStateError,
    DeadlineExceededError,
    EncryptionFailedError,
    ErrorCode,
    HandlerNotFoundError,
    InternalError,
    InvalidStateError,
    MeshError,
    MeshSystemError,
    MessageTooLargeError,
    NetworkError,
    NodeLostError,
    NotLeaderError,
    ProtocolError,
    ReplayDetectedError,
    ResourceExhaustedError,
    SecurityError,
    SecurityLevelTooLowError,
    SignatureInvalidError,
    TokenExpiredError,
    TokenRevokedError,
    UnavailableError,
    UnsupportedVersionError,
    ValidationFailedError,
    category_of,
    decode_header,
    encode_header,
    error_class,
    error_from_wire,
    error_header,
)

# The wire contract: these numbers never change (docs/errors.md).
CODES = {
    "BAD_FORMAT": 1000,
    "UNSUPPORTED_VERSION": 1001,
    "VALIDATION_FAILED": 1002,
    "HANDLER_NOT_FOUND": 1003,
    "INVALID_STATE": 1004,
    "MESSAGE_TOO_LARGE": 1005,
    "AUTHENTICATION_FAILED": 2000,
    "TOKEN_EXPIRED": 2001,
    "ACCESS_DENIED": 2002,
    "ENCRYPTION_FAILED": 2003,
    "SIGNATURE_INVALID": 2004,
    "TOKEN_REVOKED": 2005,
    "REPLAY_DETECTED": 2006,
    "SECURITY_LEVEL_TOO_LOW": 2007,
    "RESOURCE_EXHAUSTED": 3000,
    "CONFIGURATION": 3001,
    "NETWORK": 3002,
    "INTERNAL": 3003,
    "DEADLINE_EXCEEDED": 3004,
    "NODE_LOST": 3005,
    "UNAVAILABLE": 3006,
    "CORRUPT_STATE": 3007,
    "NOT_LEADER": 3008,
    "CANCELLED": 3009,
}

CLASSES: dict[int, type[MeshError]] = {
    1000: BadFormatError,
    1001: UnsupportedVersionError,
    1002: ValidationFailedError,
    1003: HandlerNotFoundError,
    1004: InvalidStateError,
    1005: MessageTooLargeError,
    2000: AuthenticationFailedError,
    2001: TokenExpiredError,
    2002: AccessDeniedError,
    2003: EncryptionFailedError,
    2004: SignatureInvalidError,
    2005: TokenRevokedError,
    2006: ReplayDetectedError,
    2007: SecurityLevelTooLowError,
    3000: ResourceExhaustedError,
    3001: ConfigurationError,
    3002: NetworkError,
    3003: InternalError,
    3004: DeadlineExceededError,
    3005: NodeLostError,
    3006: UnavailableError,
    3007: CorruptStateError,
    3008: NotLeaderError,
    3009: CancelledError,
}

RETRYABLE = {3000, 3002, 3004, 3005, 3006, 3008}

BASES = {Category.PROTOCOL: ProtocolError, Category.SECURITY: SecurityError, Category.SYSTEM: MeshSystemError}


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_codes_have_their_exact_wire_numbers() -> None:
    """Every ErrorCode has the number of the wire contract, and there are no others."""
    assert {code.name: int(code) for code in ErrorCode} == CODES


def test_codes_are_unique() -> None:
    """No two names share a number (an IntEnum alias would hide one)."""
    assert len({int(c) for c in ErrorCode}) == len(ErrorCode) == len(ErrorCode.__members__)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_category_is_the_thousands_digit(code: ErrorCode) -> None:
    """1xxx is protocol, 2xxx security, 3xxx system."""
    expected = {1: Category.PROTOCOL, 2: Category.SECURITY, 3: Category.SYSTEM}[int(code) // 1000]
    assert code.category is expected
    assert category_of(int(code)) is expected


@pytest.mark.parametrize(
    "code, category",
    [(1999, Category.PROTOCOL), (1042, Category.PROTOCOL), (2500, Category.SECURITY), (3999, Category.SYSTEM),
     (4000, Category.SYSTEM), (9999, Category.SYSTEM), (999, Category.SYSTEM)],
)
def test_unknown_codes_get_a_category_from_their_thousands_digit(code: int, category: Category) -> None:
    """Codes this version does not know still have a category; outside 1-3 thousand it is system."""
    assert category_of(code) is category


def test_each_code_has_exactly_one_class() -> None:
    """Among the MeshError subclasses of the taxonomy, each code is declared by exactly one class."""
    declaring: dict[int, list[type]] = {}
    for cls in _all_subclasses(MeshError):
        # Subclasses elsewhere (e.g. TopologyError) refine a class without a code of their own.
        if cls.__module__ == MeshError.__module__ and "code" in vars(cls):
            declaring.setdefault(int(cls.code), []).append(cls)
    assert {code: [cls] for code, cls in CLASSES.items()} == declaring


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_error_class_maps_each_code_to_its_class(code: ErrorCode) -> None:
    """error_class(code) is the class for the code, under the base of its category."""
    cls = error_class(int(code))
    assert cls is CLASSES[int(code)]
    assert cls.code == code
    assert issubclass(cls, BASES[code.category])


def test_error_class_of_an_unknown_code_is_mesh_error() -> None:
    """A code this version does not know maps to MeshError itself."""
    assert error_class(4242) is MeshError
    assert error_class(1999) is MeshError


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_retryable_flags_are_as_documented(code: ErrorCode) -> None:
    """Only resource exhaustion, network, deadline, node lost, unavailable and not-leader are retryable."""
    assert CLASSES[int(code)].retryable is (int(code) in RETRYABLE)
    assert CLASSES[int(code)]().retryable is (int(code) in RETRYABLE)


def test_never_started_codes_are_retryable_and_exactly_the_documented_two() -> None:
    """The codes proving a command never ran (which the client resends by itself and the
    broker never keeps as an answer) are RESOURCE_EXHAUSTED and UNAVAILABLE, both retryable."""
    assert NEVER_STARTED == {ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.UNAVAILABLE}
    assert all(error_class(int(code)).retryable for code in NEVER_STARTED)


def test_security_and_protocol_errors_are_never_retryable() -> None:
    """A retry cannot fix a protocol or security error."""
    assert all(not cls.retryable for code, cls in CLASSES.items() if code < 3000)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_error_from_wire_rebuilds_the_class_of_a_known_code(code: ErrorCode) -> None:
    """A known code becomes its class with the message and details received."""
    err = error_from_wire(int(code), "it went wrong", int(code) in RETRYABLE, {"field": "x"})
    assert type(err) is CLASSES[int(code)]
    assert err.code == code
    assert err.message == "it went wrong" and str(err) == "it went wrong"
    assert err.details == {"field": "x"}
    assert err.retryable is (int(code) in RETRYABLE)


def test_for_a_known_code_the_class_decides_retryable() -> None:
    """A known code keeps its class's retryable flag whatever the wire says (documented in errors.md)."""
    assert error_from_wire(1002, "m", True).retryable is False
    assert error_from_wire(3002, "m", False).retryable is True


@pytest.mark.parametrize("retryable", [True, False])
@pytest.mark.parametrize("code", [1042, 2999, 4000, 9999])
def test_error_from_wire_keeps_unknown_codes_as_numbers(code: int, retryable: bool) -> None:
    """An unknown code from a newer peer becomes a MeshError that keeps the number and the flag."""
    err = error_from_wire(code, "from the future", retryable, {"k": 1})
    assert type(err) is MeshError
    assert err.code == code and isinstance(err.code, int)
    assert err.retryable is retryable
    assert err.message == "from the future" and err.details == {"k": 1}
    assert err.category is category_of(code)


def test_error_from_wire_without_details_has_empty_details() -> None:
    """Details default to an empty dict."""
    assert error_from_wire(1003, "m", False).details == {}
    assert error_from_wire(4000, "m", False, None).details == {}


def test_an_unknown_code_does_not_change_the_class_default() -> None:
    """Setting a code or retryable flag on one MeshError leaves the class untouched."""
    error_from_wire(4000, "m", True)
    assert MeshError.code == ErrorCode.INTERNAL and MeshError.retryable is False


@pytest.mark.parametrize("cls", list(CLASSES.values()), ids=lambda c: c.__name__)
def test_errors_survive_the_wire(cls: type[MeshError]) -> None:
    """error_header -> encode -> decode -> error_from_wire gives the same class, message and details."""
    original = cls("a sentence", details={"field": "a.b", "limit": 3})
    header = decode_header(encode_header(error_header(original, now=1.0, correlation_id="c1")))
    assert header.correlation_id == "c1" and header.error is not None
    e = header.error
    assert (e.code, e.message, e.retryable, dict(e.details)) == (
        int(cls.code), "a sentence", cls.retryable, {"field": "a.b", "limit": 3}
    )
    back = error_from_wire(e.code, e.message, e.retryable, dict(e.details))
    assert type(back) is cls and back.message == original.message and back.details == original.details


def test_an_unknown_code_survives_the_wire() -> None:
    """A MeshError carrying an unknown code is sent and rebuilt with that code."""
    original = error_from_wire(4321, "new", True)
    e = decode_header(encode_header(error_header(original, now=1.0))).error
    assert e is not None and (e.code, e.retryable) == (4321, True)
    assert error_from_wire(e.code, e.message, e.retryable).code == 4321


def test_a_mesh_error_without_message_uses_its_class_name() -> None:
    """The default message is the class name; repr shows the code."""
    err = NodeLostError()
    assert err.message == "NodeLostError"
    assert repr(err) == "NodeLostError(code=3005, message='NodeLostError')"


def test_mesh_errors_copy_their_details() -> None:
    """An error keeps its own copy of the details it was given."""
    details = {"field": "x"}
    err = ValidationFailedError("m", details=details)
    details["field"] = "y"
    assert err.details == {"field": "x"}
