"""Hostile MessagePack and mutations of valid messages, drawn from a `random.Random`.

Rules of this module:

* Pure functions of the `rng` they are given (and their arguments): the same seed gives
  the same bytes, so a finding is reproduced from its seed alone. No clock, no sockets.
* Hostile MessagePack is written byte by byte where `msgpack.packb` would refuse it
  (nesting past its limit, lengths that lie, reserved bytes), so the fuzzer can send
  what a peer can send, not only what our own encoder makes.
* Every generator takes a byte budget (`limit`) and stays under it, so a run on a small
  machine stays bounded; the attacks that need volume (a million empty maps) scale to it.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from typing import Any, Final

import msgpack

__all__ = [
    "DEEP",
    "raw_str",
    "raw_map",
    "deep_array",
    "many_maps",
    "hostile_value",
    "hostile_msgpack",
    "mutate_value",
    "mutate_bytes",
    "mutate_frames",
    "pack",
]

DEEP: Final = 1000  # nesting depth of the attack that found a RecursionError
_INTERESTING: Final = b"\x00\x7f\x80\x8f\x90\x9f\xa0\xbf\xc0\xc1\xc2\xc3\xc4\xca\xcb\xcf\xd3\xd9\xdb\xdc\xdd\xde\xdf\xe0\xff"


def raw_str(text: str | bytes) -> bytes:
    """MessagePack str of `text` (bytes are sent as they are: invalid UTF-8 is allowed)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    n = len(data)
    if n < 32:
        return bytes([0xA0 | n]) + data
    if n < 256:
        return b"\xd9" + bytes([n]) + data
    if n < 65536:
        return b"\xda" + struct.pack(">H", n) + data
    return b"\xdb" + struct.pack(">I", n) + data


def raw_map(items: list[tuple[bytes, bytes]]) -> bytes:
    """A MessagePack map of already encoded keys and values (duplicates kept, in order)."""
    n = len(items)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in items)


def deep_array(depth: int, leaf: bytes = b"\x01") -> bytes:
    """`depth` one-element arrays inside each other around `leaf`."""
    return b"\x91" * depth + leaf


def _deep_map(depth: int) -> bytes:
    return b"\x81\xa1k" * depth + b"\x01"


def many_maps(count: int) -> bytes:
    """An array of `count` empty maps: one byte each on the wire, a dict each in memory."""
    return b"\xdd" + struct.pack(">I", count) + b"\x80" * count


def pack(value: Any, rng: random.Random | None = None) -> bytes:
    """`value` as MessagePack, str/bin types as our encoder writes them (or the old raw
    convention, when `rng` says so); b"\\xc1" (a reserved byte) when it cannot be packed."""
    bin_type = True if rng is None else rng.random() < 0.9
    try:
        return msgpack.packb(value, use_bin_type=bin_type, strict_types=False)
    except (TypeError, ValueError, OverflowError):
        return b"\xc1"


def _huge_int(rng: random.Random) -> Any:
    return rng.choice([2**64 - 1, -(2**63), 2**63, -1, 0, 2**31, 10**18])


def _odd_float(rng: random.Random) -> float:
    return rng.choice([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, -1.0])


def _odd_text(rng: random.Random) -> str:
    return rng.choice(["", " ", "a" * 65, "\x00", "mesh", "mesh.stats", "é" * 40, "\ud800", "*", "..", "a.", "x" * 5000])


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """A Python value that MessagePack can carry and a validator may not expect."""
    pick = rng.randrange(14 if depth < 3 else 9)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return _huge_int(rng)
    if pick == 3:
        return _odd_float(rng)
    if pick == 4:
        return _odd_text(rng)
    if pick == 5:
        return rng.randbytes(rng.randrange(0, 40))
    if pick == 6:
        return msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(rng.choice([1, 2, 4, 8, 16, 3])))
    if pick == 7:
        return rng.randrange(-10, 70_000)
    if pick == 8:
        return "".join(rng.choice("ab.-_*?1") for _ in range(rng.randrange(1, 12)))
    if pick == 9:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if pick == 10:  # non-string keys: ints, bytes, floats, None, booleans, tuples
        keys: list[Any] = [1, -1, b"k", 1.5, None, True, (1, 2), "k"]
        return {rng.choice(keys): hostile_value(rng, depth + 1) for _ in range(rng.randrange(1, 4))}
    if pick == 11:
        return {_odd_text(rng): hostile_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    if pick == 12:
        return {"$ref": "#", "type": rng.choice([12, "object", None, [], {"$ref": "#/"}])}
    return [None] * rng.randrange(1000, 20_000)


# ------------------------------------------------------------- raw hostile bytes


def _deep_v_header(rng: random.Random, id: str, body: list[tuple[bytes, bytes]]) -> bytes:
    """A header map whose `v` is an array nested `DEEP` deep (the RecursionError attack)."""
    return raw_map([(raw_str("v"), deep_array(rng.choice([DEEP, 100, 2000]))), *body, (raw_str("id"), raw_str(id))])


def hostile_msgpack(rng: random.Random, limit: int, id: str = "fuzz-id") -> bytes:
    """Bytes that are (or nearly are) MessagePack and that a decoder must survive.

    `id` is written where a header would carry one, so a reply can still be matched.
    """
    body = [(raw_str("type"), raw_str(rng.choice(["command", "event", "response", "cancel"]))),
            (raw_str("ts"), pack(0.0))]
    makers: list[Callable[[], bytes]] = [
        lambda: _deep_v_header(rng, id, body),
        lambda: raw_map([(raw_str("v"), b"\x01"), *body, (raw_str("id"), raw_str(id)),
                         (raw_str("metadata"), _deep_map(rng.choice([200, DEEP])))]),
        lambda: deep_array(rng.choice([DEEP, 5000, 100_000]) if limit > 100_000 else DEEP),
        lambda: _deep_map(DEEP),
        lambda: many_maps(max(1, min(limit - 8, rng.choice([1000, 100_000, 2_100_000])))),
        lambda: b"\xdd\xff\xff\xff\xff" + b"\x80" * rng.randrange(0, 64),  # a length that lies
        lambda: b"\xdf\xff\xff\xff\xff" + raw_str("v") + b"\x01",
        lambda: b"\xdb\xff\xff\xff\xf0abc",
        lambda: raw_map([(b"\x01", b"\x01"), (raw_str("id"), raw_str(id))]),  # an int key
        lambda: raw_map([(b"\xc4\x01v", b"\x01"), (raw_str("id"), raw_str(id))]),  # a bin key
        lambda: raw_map([(b"\x91\x01", b"\x01"), (raw_str("id"), raw_str(id))]),  # an array key
        lambda: raw_map([(raw_str("v"), b"\x01"), (raw_str("id"), b"\xc4" + bytes([len(id)]) + id.encode())]),
        lambda: raw_map([(raw_str("v"), b"\x01"), (raw_str("id"), raw_str(b"\xff\xfe" + id.encode()))]),
        lambda: raw_map([(raw_str("v"), b"\x01"), (raw_str("v"), b"\x02"), *body, (raw_str("id"), raw_str(id))]),
        lambda: raw_map([(raw_str("v"), b"\xcf" + b"\xff" * 8), *body, (raw_str("id"), raw_str(id))]),
        lambda: raw_map([(raw_str("v"), b"\x01"), *body, (raw_str("id"), raw_str(id)),
                         (raw_str("ts"), b"\xd6\xff" + rng.randbytes(4))]),  # a Timestamp ext
        lambda: bytes([rng.choice(_INTERESTING)]) * rng.randrange(1, 64),
        lambda: rng.randbytes(rng.randrange(0, 256)),
        lambda: pack(hostile_value(rng), rng),
    ]
    out = rng.choice(makers)()
    return out if len(out) <= limit else out[:limit]


# ------------------------------------------------------------------ mutations


def mutate_value(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """`value` (a decoded message map, say) with one structural change somewhere inside."""
    if isinstance(value, dict) and value and depth < 4 and rng.random() < 0.6:
        key = rng.choice(list(value))
        out = dict(value)
        op = rng.randrange(8)
        if op == 0:
            del out[key]
        elif op == 1:
            out[rng.choice(["extra", "__proto__", "security", "error", "seq", "deadline", "metadata"])] = hostile_value(rng)
        elif op == 2:
            out[key] = hostile_value(rng)
        elif op == 3:
            out[key] = [out[key]]
        elif op == 4 and isinstance(key, str):
            out[key.encode("utf-8", "surrogatepass")] = out.pop(key)  # the key as bin (even a lone surrogate)
        elif op == 5:
            out[rng.choice([1, None, 1.5, b"v", True])] = out[key]
        elif op == 6:
            out = {k: out[k] for k in reversed(list(out))}
        else:
            out[key] = mutate_value(rng, out[key], depth + 1)
        return out
    if isinstance(value, list) and value and depth < 4:
        out_list = list(value)
        i = rng.randrange(len(out_list))
        out_list[i] = mutate_value(rng, out_list[i], depth + 1)
        return out_list
    if isinstance(value, str):
        return rng.choice([value.encode("utf-8", "surrogatepass"), value + "\x00", value[:-1], value * 3, "", value.upper(), 7])
    if isinstance(value, bool):
        return rng.choice([not value, int(value), None, "true"])
    if isinstance(value, int):
        return rng.choice([-value, value + 1, float(value), str(value), _huge_int(rng), True])
    if isinstance(value, float):
        return rng.choice([_odd_float(rng), int(value) if math.isfinite(value) else 2**64, str(value), -value])
    if isinstance(value, bytes):
        return mutate_bytes(rng, value, len(value) + 16) if value else b"\x00"
    return hostile_value(rng)


def mutate_bytes(rng: random.Random, data: bytes, limit: int) -> bytes:
    """`data` with one to four byte-level changes (flips, interesting bytes, cuts, copies)."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(7)
        n = len(buf)
        if op == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice(_INTERESTING)
        elif op == 2 and n:
            del buf[rng.randrange(n):]  # truncated
        elif op == 3:
            buf += rng.randbytes(rng.randrange(1, 16))  # trailing bytes
        elif op == 4 and n:
            i = rng.randrange(n)
            buf[i:i] = buf[i : i + rng.randrange(1, 32)]  # a copied run
        elif op == 5 and n:
            i = rng.randrange(n)
            del buf[i : i + rng.randrange(1, 8)]
        else:
            buf.insert(rng.randrange(n + 1), rng.choice(_INTERESTING))
    return bytes(buf[:limit])


def mutate_frames(rng: random.Random, frames: list[bytes], limit: int) -> list[bytes]:
    """`frames` with a frame added, dropped, emptied, duplicated or swapped (wrong counts)."""
    out = list(frames)
    op = rng.randrange(6)
    if op == 0 or not out:
        out.insert(rng.randrange(len(out) + 1), rng.choice([b"", b"\xc0", rng.randbytes(8)]))
    elif op == 1 and len(out) > 1:
        del out[rng.randrange(len(out))]
    elif op == 2:
        out[rng.randrange(len(out))] = b""
    elif op == 3:
        out = out + out
    elif op == 4 and len(out) > 1:
        out.reverse()
    else:
        out.extend([b"\xc0"] * rng.randrange(2, 8))
    total = 0
    kept = []
    for frame in out:
        total += len(frame)
        if total > limit:
            break
        kept.append(frame)
    return kept or [b""]
