"""Native CPU kernels: C sources compiled on first use with the system C compiler, loaded with ctypes.

Why C and not a torch extension: a plain shared library builds in about a second
(a torch C++ extension takes ~25 s and needs ninja), and it links the same
`libgomp.so.1` torch has already loaded, so both share one OpenMP thread pool.
The build lands in `<cache>/kernels/<hash>/` (hash of source, flags and
compiler); when no compiler is found or the build fails, `load()` returns None
and callers keep their pure-PyTorch path. `DELTASERVE_NATIVE=off` disables the
kernels (the reference path, for tests and comparisons).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from deltaserve import env

log = logging.getLogger(__name__)

SRC_DIR = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
_LOADED: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    return env.native_kernels()


def _cache_root() -> Path:
    from deltaserve.models.registry import cache_dir

    return cache_dir() / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(name: str) -> Path | None:
    src = SRC_DIR / f"{name}.c"
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: native kernel %s disabled, using the PyTorch path", name)
        return None
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    headers = b"".join(h.read_bytes() for h in sorted(SRC_DIR.glob("*.h")))  # sources #include them
    key = hashlib.sha256(src.read_bytes() + headers + " ".join(FLAGS + ver).encode()).hexdigest()[:16]
    out = _cache_root() / key / f"{name}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: no half-written .so
        tmp_so = Path(tmp) / out.name
        r = subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp_so), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            log.warning("building native kernel %s failed, using the PyTorch path:\n%s", name, r.stderr[-2000:])
            return None
        os.replace(tmp_so, out)
    return out


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library `name` (from `kernels/<name>.c`), or None if it cannot be built here."""
    if not enabled():
        return None
    if name not in _LOADED:
        import torch  # noqa: F401  (torch's libgomp must be loaded first so ours resolves to it)

        path = _build(name)
        try:
            _LOADED[name] = ctypes.CDLL(str(path)) if path else None
        except OSError as e:
            log.warning("loading native kernel %s failed (%s), using the PyTorch path", name, e)
            _LOADED[name] = None
    return _LOADED[name]
