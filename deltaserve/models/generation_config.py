"""The sampling defaults of a model's `generation_config.json` (vLLM's `--generation-config auto`).

A request that omits temperature / top_p / top_k gets the model author's values instead of the OpenAI
defaults (1.0 / 1.0 / off). Other keys there (repetition_penalty, min_p, ...) are ignored: the sampler does not
implement them. GGUF files carry no such file, so a converted GGUF model has no defaults.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("deltaserve.models")


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-model defaults; None: the field is not set (the OpenAI default applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


def load_sampling_defaults(directory: Path) -> SamplingDefaults:
    """The defaults in `directory/generation_config.json`; none when the file is absent, unreadable or out of
    range (a warning, not an error: serving the model does not depend on it)."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return SamplingDefaults()
    try:
        raw = json.loads(path.read_text())
        if raw.get("do_sample") is False:  # the author asks for greedy decoding
            return SamplingDefaults(temperature=0.0)
        t, p, k = raw.get("temperature"), raw.get("top_p"), raw.get("top_k")
        out = SamplingDefaults(
            temperature=float(t) if t is not None and 0 <= float(t) <= 2 else None,
            top_p=float(p) if p is not None and 0 < float(p) <= 1 else None,
            top_k=int(k) if k is not None and int(k) >= 0 else None)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return SamplingDefaults()
    return out
