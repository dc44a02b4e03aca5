"""Model configuration: one frozen dataclass for the Llama family (llama, qwen2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHS = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool  # qwen2 has biases on q, k and v projections

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """From a HF config.json dict."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        rope_scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope_scaling {rope_scaling}")
        rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        return cls(
            arch=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A HF config.json dict (used to build the transformers reference in tests)."""
        archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        d = {
            "architectures": [archs[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.arch == "llama":
            d["attention_bias"] = self.qkv_bias
        return d
