"""The bytes of one ``PushChunksRequest`` (protos/v1/exchange.proto), encoded and decoded by hand.

Why not the generated message class: protobuf copies a ``bytes`` field when it parses and again
when it serializes, and on this hardware that halved the stream's throughput (FACTS.md: 0.38–0.57
GB/s for protobuf messages against 0.68–1.02 GB/s for raw bytes). The wire format stays exactly the
proto's (tests/test_grpc_exchange.py round-trips both ways against ``exchange_pb2``); only the
Python side is cheaper: the payload is copied once into the outgoing bytes, and an incoming payload
is a ``memoryview`` of the received bytes that numpy reads in place.

Also here: float32 <-> bfloat16 on the wire (round to nearest even, as MLX and PyTorch do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protos.v1 import exchange_pb2 as pb

FLOAT32 = pb.WIRE_DTYPE_FLOAT32
BFLOAT16 = pb.WIRE_DTYPE_BFLOAT16
WIRE_DTYPES = {"float32": FLOAT32, "bfloat16": BFLOAT16}
ITEMSIZE = {FLOAT32: 4, BFLOAT16: 2}

# Field numbers and wire types of PushChunksRequest.
_SEQ, _INDEX, _ELEMENTS, _DTYPE, _GOODBYE, _REASON, _DATA = 1, 2, 3, 4, 5, 6, 15
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_DATA_KEY = bytes([(_DATA << 3) | _LEN])


@dataclass(frozen=True)
class Chunk:
    """One decoded PushChunksRequest; ``data`` is a view of the received message, not a copy."""

    seq: int
    index: int
    elements: int
    dtype: int
    data: memoryview
    goodbye: bool = False  # the sender closed its exchange: the link's last message
    reason: str = ""  # on a goodbye: why the sender's group was spent, if it was


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint in PushChunksRequest")


def encode(seq: int, index: int, elements: int, dtype: int, data=b"",
           goodbye: bool = False, reason: str = "") -> bytes:
    """Serialize a PushChunksRequest; ``data`` is any buffer (a numpy array is not copied twice).

    Fields equal to their default are left out, as proto3 does.
    """
    head = bytearray()
    fields = ((_SEQ, seq), (_INDEX, index), (_ELEMENTS, elements), (_DTYPE, dtype),
              (_GOODBYE, int(goodbye)))
    for field, value in fields:
        if value:
            head.append((field << 3) | _VARINT)
            _put_varint(head, value)
    if reason:
        text = reason.encode()
        head.append((_REASON << 3) | _LEN)
        _put_varint(head, len(text))
        head += text
    view = memoryview(data).cast("B")
    if view.nbytes:
        head += _DATA_KEY
        _put_varint(head, view.nbytes)
    return b"".join((head, view))


def decode(raw: bytes) -> Chunk:
    """Parse a PushChunksRequest; unknown fields are skipped, as protobuf does."""
    values = {_SEQ: 0, _INDEX: 0, _ELEMENTS: 0, _DTYPE: 0, _GOODBYE: 0}
    data = memoryview(b"")
    reason = ""
    view = memoryview(raw)
    pos, end = 0, len(raw)
    while pos < end:
        key, pos = _get_varint(raw, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _get_varint(raw, pos)
            if field in values:
                values[field] = value
        elif wire_type == _LEN:
            length, pos = _get_varint(raw, pos)
            if pos + length > end:
                raise ValueError("truncated PushChunksRequest")
            if field == _DATA:
                data = view[pos : pos + length]
            elif field == _REASON:
                reason = bytes(view[pos : pos + length]).decode(errors="replace")
            pos += length
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in PushChunksRequest")
    return Chunk(values[_SEQ], values[_INDEX], values[_ELEMENTS], values[_DTYPE], data,
                 bool(values[_GOODBYE]), reason)


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even. NaN stays NaN."""
    bits = x.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def payload(values: np.ndarray, dtype: int) -> np.ndarray:
    """What goes on the wire for a float32 slice: the slice itself, or its bfloat16 bits."""
    return values if dtype == FLOAT32 else to_bfloat16(values)


def values(data: memoryview, dtype: int) -> np.ndarray:
    """The float32 values of a received payload (a view when float32 on the wire)."""
    if dtype == FLOAT32:
        return np.frombuffer(data, dtype="<f4")
    return from_bfloat16(np.frombuffer(data, dtype="<u2"))
