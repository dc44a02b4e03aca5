"""GGUF loader: metadata -> ModelConfig, tensors dequantized -> HF-named state dict.

Dequantization (Q4_0/Q4_1/Q4_K/Q5_0/Q5_K/Q6_K/Q8_0/F16/BF16/F32) is done by the
`gguf` package that llama.cpp maintains; this module owns the name mapping and
undoes llama.cpp's Q/K row permutation for the llama architecture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deltaserve.config import SUPPORTED_ARCHS, ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    names = {t.name for t in reader.tensors}
    tok = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(a("vocab_size", len(tok) if tok is not None else 0))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = max(vocab, int(emb.shape[1]))
    return ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_layers=int(a("block_count")),
        num_heads=heads,
        num_kv_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("attention.key_length", hidden // heads)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=int(a("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert permute (interleaved -> half-split RoPE rows).

    llama.cpp stores Q/K rows per head as [head_dim/2, 2] pairs; HF's rotate_half
    layout wants [2, head_dim/2].
    """
    rows = w.shape[0]
    # [n_head, head_dim/2, 2, ...] -> [n_head, 2, head_dim/2, ...]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GGUF file into (config, HF-named state dict in `dtype`)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    cfg = read_config(reader)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                continue
            name = f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            continue  # rope_freqs etc. are not used by these configs
        arr = dequantize(t.data, t.tensor_type)
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if cfg.arch == "llama" and rest_is(t.name, "attn_q"):
            arr = _unpermute(arr, cfg.num_heads)
        elif cfg.arch == "llama" and rest_is(t.name, "attn_k"):
            arr = _unpermute(arr, cfg.num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
    return cfg, state


def rest_is(name: str, prefix: str) -> bool:
    return name.startswith("blk.") and name.split(".", 2)[2].startswith(prefix + ".")
