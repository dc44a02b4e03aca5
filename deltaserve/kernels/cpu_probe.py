"""Whether this CPU's bf16 pair dot products outrun fp32 FMA (`cpu_probe.c`), measured once per process.

AVX512-BF16 in the CPU flags does not make bf16 products fast: they are twice fp32's rate on AMD Zen 4 and half of
it on a 2-core Intel Xeon (family 6 model 207). `layers.attention.select_backend` (once, at model build: the tiled
kernel's product form and the short/tiled split) and `layers.linear` ask `bf16_dot_fast()` which form to run.
`DELTASERVE_BF16_DOT=on|off` fixes the answer; `python -m deltaserve.kernels.cpu_probe` prints the measured ratio.
"""

from __future__ import annotations

import ctypes

from deltaserve import env
from deltaserve.kernels import load

_SPEED: list[float] = []


def bf16_dot_speed() -> float:
    """bf16 pair-product FLOP rate / fp32 FMA FLOP rate on one core (0.0: no AVX512-BF16, or no native build)."""
    if not _SPEED:
        lib = load("cpu_probe")
        if lib is None:
            _SPEED.append(0.0)
        else:
            lib.bf16_dot_speed.restype = ctypes.c_double
            lib.bf16_dot_speed.argtypes = [ctypes.c_int, ctypes.c_int]
            _SPEED.append(float(lib.bf16_dot_speed(10000, 5)))  # ~0.6 ms: 2 x 5 rounds of 120k instructions
    return _SPEED[0]


def bf16_dot_fast() -> bool:
    """Run products as bf16 pairs (True) or widen to fp32 (False): the env override, else the measured ratio."""
    fixed = env.bf16_dot()
    return fixed if fixed is not None else bf16_dot_speed() > 1.0


if __name__ == "__main__":
    r = bf16_dot_speed()
    print(f"bf16 dot / fp32 FMA FLOP rate: {r:.2f} -> products in {'bf16 pairs' if bf16_dot_fast() else 'fp32'}")
