"""Load a model directory or GGUF file into (config, state dict, tokenizer).

GGUF files are converted once into a cache directory (config.json, fp32
safetensors, tokenizer files) because dequantizing with numpy and building a
tokenizer from GGUF metadata take tens of seconds; later loads mmap the
safetensors. fp32 keeps the dequantized values exact; the run dtype is applied
when the engine builds the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from deltaserve.config import ModelConfig
from deltaserve.models.registry import cache_dir, resolve


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_dir(gguf_path: Path) -> Path:
    """Convert a GGUF into a HF-style directory in the cache (once) and return it."""
    out = cache_dir() / "converted" / f"{gguf_path.stem}-{_gguf_key(gguf_path)}"
    if (out / "done").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from deltaserve.models.gguf_loader import load_gguf

    try:
        cfg, state = load_gguf(gguf_path, torch.float32)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise ValueError(f"cannot read GGUF {gguf_path}: {e}") from e
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(tmp))
    (tmp / "done").write_text("ok")
    if out.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def model_dir(model: str) -> Path:
    """--model (name, HF dir or .gguf) -> HF-style directory with config, weights and tokenizer."""
    p = resolve(model)
    return converted_dir(p) if p.is_file() else p


def load_config(directory: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((directory / "config.json").read_text()))


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state
