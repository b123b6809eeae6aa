"""The docs agree with the code: protocol.md's test vectors are what the codec writes and reads,
and errors.md lists every error code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mesh.protocol import (
    ID_PATTERN,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_METADATA_ENTRIES,
    NAME_PATTERN,
    PROTOCOL_VERSION,
    TOPIC_PATTERN,
    ErrorCode,
    ErrorInfo,
    Header,
    MessageType,
    SecurityInfo,
    SecurityLevel,
    decode_header,
    decode_payload,
    encode_cancel_header,
    encode_header,
    encode_payload,
    encode_progress_header,
    error_class,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"
PROTOCOL = (DOCS / "protocol.md").read_text(encoding="utf-8")
ERRORS = (DOCS / "errors.md").read_text(encoding="utf-8")


def _from_json(value: Any) -> Any:
    """The doc's JSON notation to Python: {"$bin": hex} is bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _hex(lines: list[str] | str) -> bytes:
    text = "".join(lines) if isinstance(lines, list) else lines
    return bytes.fromhex(re.sub(r"\s+", "", text))


def _vectors() -> list[dict[str, Any]]:
    section = PROTOCOL.split("## 11. Test vectors", 1)[1]
    blocks = re.findall(r"```json\n(.*?)\n```", section, flags=re.DOTALL)
    return [json.loads(block) for block in blocks]


VECTORS = _vectors()


def header_from_wire(m: dict[str, Any]) -> Header:
    """The Header a wire map describes, built without the codec."""
    sec, err = m.get("security"), m.get("error")
    return Header(
        type=MessageType(m["type"]),
        id=m["id"],
        timestamp=m["ts"],
        service=m.get("service"),
        action=m.get("action"),
        topic=m.get("topic"),
        seq=m.get("seq"),
        correlation_id=m.get("correlation_id"),
        deadline=m.get("deadline"),
        metadata=m.get("metadata", {}),
        security=None if sec is None else SecurityInfo(
            SecurityLevel(sec["level"]), sec.get("encryption"), sec.get("signature"), sec.get("token")
        ),
        error=None if err is None else ErrorInfo(
            err["code"], err["message"], err["retryable"], err.get("details", {})
        ),
        version=m["v"],
    )


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (1 and 1.0 and True differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_the_doc_has_the_required_vectors() -> None:
    """protocol.md has a command, a response, an error reply, a command with metadata and security,
    a cancel and a progress."""
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names))
    kinds = {(v["header"]["type"], "metadata" in v["header"] and "security" in v["header"]) for v in VECTORS}
    assert {("command", False), ("response", False), ("error", False), ("command", True), ("cancel", False),
            ("progress", False)} <= kinds


@pytest.mark.parametrize("vector", [v for v in VECTORS if v["header"]["type"] in ("cancel", "progress")],
                         ids=lambda v: v["name"])
def test_the_fast_cancel_and_progress_encoders_write_the_documented_bytes(vector: dict[str, Any]) -> None:
    """encode_cancel_header / encode_progress_header give the vectors' bytes, like encode_header."""
    h = vector["header"]
    encode = encode_cancel_header if h["type"] == "cancel" else encode_progress_header
    assert encode(h["correlation_id"], now=h["ts"], id=h["id"]) == _hex(vector["header_hex"])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_encoding_the_documented_fields_gives_the_documented_bytes(vector: dict[str, Any]) -> None:
    """encode_header / encode_payload of the vector's fields give exactly its hex."""
    wire = _from_json(vector["header"])
    assert encode_header(header_from_wire(wire)) == _hex(vector["header_hex"])
    assert encode_payload(_from_json(vector["payload"])) == _hex(vector["payload_hex"])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_decoding_the_documented_bytes_gives_the_documented_fields(vector: dict[str, Any]) -> None:
    """decode_header / decode_payload of the vector's hex give its fields, types and key order included."""
    wire = _from_json(vector["header"])
    header_frame, payload_frame = _hex(vector["header_hex"]), _hex(vector["payload_hex"])
    assert decode_header(header_frame) == header_from_wire(wire)
    assert same(msgpack.unpackb(header_frame, raw=False), wire)
    assert same(decode_payload(payload_frame), _from_json(vector["payload"]))


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vectors_are_valid_messages_of_version_1(vector: dict[str, Any]) -> None:
    """Every vector is a version-1 header within the size limit, and error replies carry nil."""
    header_frame = _hex(vector["header_hex"])
    assert vector["header"]["v"] == PROTOCOL_VERSION
    assert len(header_frame) <= MAX_HEADER_BYTES
    if vector["header"]["type"] == "error":
        assert _hex(vector["payload_hex"]) == b"\xc0"


def test_the_documented_patterns_and_limits_are_the_codes() -> None:
    """protocol.md quotes the codec's patterns and limits verbatim."""
    for pattern in (NAME_PATTERN, TOPIC_PATTERN, ID_PATTERN):
        assert f"`{pattern}`" in PROTOCOL
    for name, value in (("MAX_HEADER_BYTES", MAX_HEADER_BYTES), ("MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES),
                        ("MAX_METADATA_ENTRIES", MAX_METADATA_ENTRIES)):
        written = f"{value:,}".replace(",", " ")  # the doc groups digits with spaces: 16 384
        assert f"| `{name}` | {written} |" in PROTOCOL, name


def _error_rows() -> dict[int, list[str]]:
    rows = {}
    for line in ERRORS.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_errors_doc_lists_every_code_with_its_number(code: ErrorCode) -> None:
    """errors.md's table has a row per code: number, name, category, retryable and class."""
    row = _error_rows().get(int(code))
    assert row is not None, f"{int(code)} {code.name} is missing from docs/errors.md"
    number, name, category, retryable, cls = row[:5]
    assert name == f"`{code.name}`"
    assert category == code.category.value
    assert retryable.strip("*") == ("yes" if error_class(code).retryable else "no")
    assert cls == f"`{error_class(code).__name__}`"


def test_errors_doc_lists_no_code_that_does_not_exist() -> None:
    """Every numbered row of errors.md is a real ErrorCode."""
    assert set(_error_rows()) == {int(c) for c in ErrorCode}
