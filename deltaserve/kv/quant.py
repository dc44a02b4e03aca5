"""KV cache formats: what one cached K or V row of one kv head is, in memory.

`--kv-cache-dtype` picks one (names as vLLM's where they overlap):
- `bfloat16`, `float32`: the row is `head_dim` elements of that dtype, as the model computed them;
- `int8`: `head_dim` signed bytes then one little-endian fp32 scale (`head_dim + 4` bytes, pool dtype uint8);
  the value is `byte * scale`, scale = max|x| / 127 over the row (symmetric, round half to even);
- `fp8` (`fp8_e4m3`): `head_dim` float8 e4m3 (OCP "fn": no infinities, max 448) then the fp32 scale;
  the value is `fp8 * scale`, scale = max|x| / 448 over the row.
`auto` is the model's dtype.

The scale rides in the row so a quantized cache is still one tensor a layer, `[num_slots, kv_heads, row_width]`:
slot reads and writes (`KVPool.read_rows`, tiers, the session store) move rows as bytes and never see the
difference. Rows are quantized once, when written (`quantize_rows`), each on its own: a token's stored K/V
depend only on the token's own K/V, so a context computed in one span or many is stored identically (the
stateful == stateless guarantee holds at a given cache dtype). The kernels dequantize a row as they read it
(`kernels/paged_attention.c`: `kind` codes below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_BYTES = 4  # one fp32 scale at the end of a quantized row
KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8", "fp8", "fp8_e4m3")
_ALIASES = {"fp8": "fp8_e4m3", "bf16": "bfloat16", "fp32": "float32"}
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT8_MAX = 127.0  # symmetric: -128 is never produced


@dataclass(frozen=True)
class KVFormat:
    """One cache format. kind: the native kernels' code for it (0 fp32, 1 bf16, 2 int8, 3 fp8 e4m3; -1 none)."""

    name: str  # "float32" | "bfloat16" | "int8" | "fp8_e4m3"
    storage: torch.dtype  # element dtype of the pool's tensors
    kind: int

    @property
    def quantized(self) -> bool:
        return self.kind >= 2

    def row_width(self, head_dim: int) -> int:
        """Elements of `storage` a (slot, kv head) row takes."""
        return head_dim + SCALE_BYTES if self.quantized else head_dim

    def row_bytes(self, head_dim: int) -> int:
        return self.row_width(head_dim) * torch.empty((), dtype=self.storage).element_size()


FORMATS = {
    "float32": KVFormat("float32", torch.float32, 0),
    "bfloat16": KVFormat("bfloat16", torch.bfloat16, 1),
    "int8": KVFormat("int8", torch.uint8, 2),
    "fp8_e4m3": KVFormat("fp8_e4m3", torch.uint8, 3),
    "float16": KVFormat("float16", torch.float16, -1),  # a float16 model's own cache (no native kernel takes it)
}


def resolve(name: str | None, model_dtype: torch.dtype) -> KVFormat:
    """The format `--kv-cache-dtype name` means for a model computing in `model_dtype` (None / "auto": that dtype).
    Raises ValueError naming the choices for an unknown name."""
    if name is None or name == "auto":
        name = str(model_dtype).removeprefix("torch.")
    key = _ALIASES.get(name, name)
    if key not in FORMATS:
        raise ValueError(f"unknown KV cache dtype {name!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    return FORMATS[key]


def quantize_rows(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """x [..., D] (any float dtype) -> [..., D + 4] uint8 rows of `fmt` (quantized formats only). Pure."""
    assert fmt.quantized, fmt
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    top = _INT8_MAX if fmt.kind == 2 else _FP8_MAX
    # an all-zero row keeps scale 0: its bytes are 0 and so is every value read back
    scale = amax / top
    inv = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
    y = xf * inv  # [..., D] in [-top, top]
    if fmt.kind == 2:
        body = torch.round(y).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8).view(torch.uint8)
    else:
        body = y.clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    tail = scale.contiguous().view(torch.uint8)  # [..., 4]: the fp32 scale's bytes, little-endian
    return torch.cat([body, tail], dim=-1)


def dequantize_rows(rows: torch.Tensor, fmt: KVFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """rows [..., D + 4] uint8 of `fmt` -> [..., D] values in `dtype` (computed in fp32). Pure."""
    assert fmt.quantized and rows.dtype == torch.uint8, (fmt, rows.dtype)
    body = rows[..., :-SCALE_BYTES]
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)  # [..., 1]
    vals = body.view(torch.int8).float() if fmt.kind == 2 else body.contiguous().view(torch.float8_e4m3fn).float()
    return (vals * scale).to(dtype)


def store_rows(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """What the pool keeps for K or V rows x [..., D]: quantized rows, or x in the storage dtype."""
    return quantize_rows(x, fmt) if fmt.quantized else x.to(fmt.storage)


def load_rows(rows: torch.Tensor, fmt: KVFormat, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows back as values [..., D] in `dtype` (a gather's worth, for the non-native paths)."""
    return dequantize_rows(rows, fmt, dtype) if fmt.quantized else rows.to(dtype)
