"""The session store's on-disk format: what makes KV valid (the stamp), KV segments with checksums, atomic writes.

A *segment* is one run of a session's tokens with their K/V rows:

    b"DSKVSEG1" | u32 header length | header JSON {"start", "num_tokens", "shape", "dtype"}
    | int32 token ids [num_tokens] | K/V rows, raw, `[num_layers, 2, num_tokens, kv_heads, head_dim]` | u32 crc32

The crc32 covers every byte before it, so a torn, truncated or flipped file is detected when it is read
(`SegmentCorrupt`) and only that segment and those after it are lost: the session's tail is recomputed,
never served from wrong KV. Files are written whole to a temporary name, fsynced and renamed
(`atomic_write`): a file is on disk entirely or not at all.

The same encoding carries a session between servers (`GET/PUT /v1/sessions/{id}/state`): an export is a stamp,
the session's metadata and its segments, each framed by a length (`pack_export` / `unpack_export`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

LAYOUT_VERSION = 1  # bump when the segment or metadata layout changes: old stores are then refused
_SEG_MAGIC = b"DSKVSEG1"
_EXPORT_MAGIC = b"DSKVEXP1"
_U32 = struct.Struct("<I")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
# numpy has no bf16: rows travel as same-width integers (uint8 rows: int8/fp8 KV with their scales, as they are)
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.uint8: torch.uint8}


class StoreError(Exception):
    """A store or an export that cannot be used (its message says why)."""


class StampMismatch(StoreError):
    """KV made under another model, dtype or layout: refused, never served."""


class SegmentCorrupt(StoreError):
    """A segment whose checksum, magic or length does not hold."""


@dataclass(frozen=True)
class Stamp:
    """What a K/V row's meaning depends on: equal stamps mean the rows can be reused as they are."""

    weights_sha256: str
    dtype: str  # the model's compute dtype
    kv_dtype: str  # the pool's KV format (`kv/quant.py`: bfloat16, float32, int8, fp8_e4m3)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout_version: int = LAYOUT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Stamp":
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as e:
            raise StoreError(f"unreadable stamp: {e}") from e

    def differences(self, other: "Stamp") -> list[str]:
        """`field: ours vs theirs` for every field that differs (empty: compatible)."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {b[k]!r} (store) vs {a[k]!r} (this server)" for k in a if a[k] != b[k]]

    def check(self, other: "Stamp", what: str) -> None:
        diff = self.differences(other)
        if diff:
            raise StampMismatch(f"{what} was made with different KV: " + "; ".join(diff))


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters (names, dtypes, shapes, bytes) as loaded: the weights KV came from."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------ segments
class Segment(NamedTuple):
    start: int  # token offset of the first token in the session's state
    tokens: list[int]
    rows: torch.Tensor  # [L, 2, len(tokens), H, D]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_segment(seg: Segment) -> bytes:
    rows = seg.rows.contiguous()
    if rows.dim() != 5 or rows.shape[2] != len(seg.tokens):
        raise ValueError(f"rows {tuple(rows.shape)} for {len(seg.tokens)} tokens")
    header = json.dumps({"start": seg.start, "num_tokens": len(seg.tokens), "shape": list(rows.shape),
                         "dtype": _dtype_name(rows.dtype)}).encode()
    raw = rows.view(_INT_VIEW[rows.dtype]).numpy().tobytes()
    body = b"".join([_SEG_MAGIC, _U32.pack(len(header)), header, struct.pack(f"<{len(seg.tokens)}i", *seg.tokens), raw])
    return body + _U32.pack(zlib.crc32(body))


def decode_segment(data: bytes | memoryview) -> Segment:
    data = memoryview(data)
    if len(data) < len(_SEG_MAGIC) + 8 or bytes(data[: len(_SEG_MAGIC)]) != _SEG_MAGIC:
        raise SegmentCorrupt("not a KV segment (bad magic or too short)")
    if zlib.crc32(data[:-4]) != _U32.unpack(data[-4:])[0]:
        raise SegmentCorrupt("checksum mismatch")
    pos = len(_SEG_MAGIC)
    (hlen,) = _U32.unpack(data[pos : pos + 4])
    pos += 4
    try:
        h = json.loads(bytes(data[pos : pos + hlen]))
        n, shape, dtype = int(h["num_tokens"]), tuple(h["shape"]), _DTYPES[h["dtype"]]
    except (ValueError, KeyError, TypeError) as e:
        raise SegmentCorrupt(f"bad segment header: {e}") from e
    pos += hlen
    tokens = list(struct.unpack(f"<{n}i", data[pos : pos + 4 * n]))
    pos += 4 * n
    raw = bytearray(data[pos:-4])
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for d in shape:
        count *= d
    if len(shape) != 5 or shape[2] != n or len(raw) != count * itemsize:
        raise SegmentCorrupt(f"segment of {n} tokens holds {len(raw)} bytes for shape {shape}")
    rows = torch.frombuffer(raw, dtype=_INT_VIEW[dtype]).view(dtype).reshape(shape)  # [L, 2, n, H, D]
    return Segment(int(h["start"]), tokens, rows)


# ------------------------------------------------------------------ files
def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` entirely or not at all: a temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ exports
def pack_export(stamp: Stamp, meta: dict[str, Any], segments: list[Segment]) -> Iterator[bytes]:
    """A session's state as a byte stream: magic, then length-framed stamp, metadata and segments."""
    yield _EXPORT_MAGIC
    for part in (stamp.to_json().encode(), json.dumps(meta).encode()):
        yield _U32.pack(len(part)) + part
    for seg in segments:
        enc = encode_segment(seg)
        yield _U32.pack(len(enc)) + enc


def unpack_export(data: bytes, expected: Stamp) -> tuple[dict[str, Any], list[Segment]]:
    """The metadata and segments of an export; StampMismatch / StoreError (malformed) / SegmentCorrupt."""
    view = memoryview(data)
    if bytes(view[: len(_EXPORT_MAGIC)]) != _EXPORT_MAGIC:
        raise StoreError("not a deltaserve session export (bad magic)")
    pos, parts = len(_EXPORT_MAGIC), []
    while pos < len(view):
        if pos + 4 > len(view):
            raise StoreError("truncated session export")
        (n,) = _U32.unpack(view[pos : pos + 4])
        if pos + 4 + n > len(view):
            raise StoreError("truncated session export")
        parts.append(view[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if len(parts) < 2:
        raise StoreError("session export without a stamp and metadata")
    expected.check(Stamp.from_json(bytes(parts[0]).decode()), "the session export")
    try:
        meta = json.loads(bytes(parts[1]))
    except ValueError as e:
        raise StoreError(f"unreadable session metadata: {e}") from e
    return meta, [decode_segment(p) for p in parts[2:]]
