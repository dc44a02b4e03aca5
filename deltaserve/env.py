"""Every `DELTASERVE_*` environment variable, parsed here and nowhere else.

| variable | values | default | effect |
|---|---|---|---|
| `DELTASERVE_CACHE` | a directory | the user cache dir (`~/.cache/deltaserve`) | where models and compiled kernels are kept |
| `DELTASERVE_API_KEY` | a key | none | one more accepted API key for `deltaserve serve` (beside `--api-key`) |
| `DELTASERVE_NATIVE` | `on` / `off` | `on` | the C kernels; `off` runs the PyTorch reference paths |
| `DELTASERVE_BF16_DOT` | `on` / `off` / `auto` | `auto` | bf16 pair products in the kernels (`auto`: measured once, `kernels/cpu_probe.py`) |
| `DELTASERVE_LARGE_BATCH_LINEAR` | `bf16` / `fp32` / `auto` | `auto` | the weight form of bf16 linears for prefill-sized batches (`layers/linear.py`) |
| `DELTASERVE_SPAN_ATTN` | `matmul` / `kernel` / `amx` / `auto` | `auto` | long query spans of a bf16 cache: bf16 matrix products (`layers/attention/span_matmul.py`), the tiled kernel, or the AMX tile kernel (`kernels/amx_attention.c`, Xeons with AMX) (`auto`: measured once, `span_probe.py`); a bf16 model's int8 / fp8 cache takes the AMX kernel where it runs unless this says `kernel` or `matmul` (then the tiled kernel) |
| `DELTASERVE_AMX_SHORT` | `on` / `off` | `on` | with the AMX span kernel, steps of decode and verify spans on `kernels/amx_short.c`, a bf16 model's int8 cache's on `kernels/amx_short_int8.c` and its fp8 cache's on `amx_short.c` (`off`: the short kernel and the AMX span kernel, as before them; A/B runs) |
| `DELTASERVE_STEP_TRACE` | a file path | none | append one JSON line per engine step (profiling) |

On/off switches all take one vocabulary: `on`, `1`, `true`, `yes` and `off`, `0`, `false`, `no` (any case);
anything else is an error naming the variable. Values are read when asked for, not at import, so a test may set
them with `monkeypatch.setenv`. (`DELTASERVE_TORCH`, read by `scripts/install.sh` only, pins the torch version.)
"""

from __future__ import annotations

import os
from pathlib import Path

_ON = frozenset({"on", "1", "true", "yes"})
_OFF = frozenset({"off", "0", "false", "no"})


class EnvError(ValueError):
    """A DELTASERVE_* variable has a value outside its vocabulary."""


def _raw(name: str) -> str | None:
    v = os.environ.get(name)
    return v.strip() if v is not None and v.strip() else None


def _switch(name: str, default: bool | None, auto: bool = False) -> bool | None:
    """on/off (or `auto` -> None where allowed); unset -> `default`."""
    v = _raw(name)
    if v is None:
        return default
    v = v.lower()
    if v in _ON:
        return True
    if v in _OFF:
        return False
    if auto and v == "auto":
        return None
    allowed = "on|off" + ("|auto" if auto else "")
    raise EnvError(f"{name}={os.environ[name]!r}: expected {allowed}")


def _choice(name: str, choices: tuple[str, ...]) -> str | None:
    """One of `choices`, or `auto`/unset -> None."""
    v = _raw(name)
    if v is None or v.lower() == "auto":
        return None
    if v.lower() in choices:
        return v.lower()
    raise EnvError(f"{name}={os.environ[name]!r}: expected {'|'.join(choices)}|auto")


def cache_dir() -> Path | None:
    v = _raw("DELTASERVE_CACHE")
    return Path(v).expanduser() if v else None


def api_key() -> str | None:
    return _raw("DELTASERVE_API_KEY")


def native_kernels() -> bool:
    return bool(_switch("DELTASERVE_NATIVE", True))


def bf16_dot() -> bool | None:
    """True/False when fixed by the variable, None to measure (`auto`)."""
    return _switch("DELTASERVE_BF16_DOT", None, auto=True)


def large_batch_linear() -> str | None:
    """'bf16' or 'fp32' when fixed by the variable, None to decide by the CPU (`auto`)."""
    return _choice("DELTASERVE_LARGE_BATCH_LINEAR", ("bf16", "fp32"))


def span_attn() -> str | None:
    """'matmul', 'kernel' or 'amx' when fixed by the variable, None to measure (`auto`)."""
    return _choice("DELTASERVE_SPAN_ATTN", ("matmul", "kernel", "amx"))


def amx_short() -> bool:
    return bool(_switch("DELTASERVE_AMX_SHORT", True))


def step_trace() -> str | None:
    return _raw("DELTASERVE_STEP_TRACE")
