"""Llama-family decoder (llama / SmolLM2, qwen2) over the paged KV pool.

Weights are fused at load time (q|k|v into one matrix, gate|up into one) so a
step runs 4 matmuls a layer over all flat tokens of the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.config import ModelConfig
from deltaserve.kv.pool import KVPool
from deltaserve.kv.quant import KVFormat, resolve
from deltaserve.layers.attention import AttentionBackend, select_backend
from deltaserve.layers.elementwise import RopeStep, Rotary, add_rms_norm, rms_norm, silu_mul
from deltaserve.layers.linear import Linear


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q_out = cfg.num_heads * cfg.head_dim
        kv_out = cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_out, kv_out
        self.qkv_w = nn.Parameter(torch.empty(q_out + 2 * kv_out, cfg.hidden_size), requires_grad=False)
        self.qkv_b = nn.Parameter(torch.empty(q_out + 2 * kv_out), requires_grad=False) if cfg.qkv_bias else None
        self.o_w = nn.Parameter(torch.empty(cfg.hidden_size, q_out), requires_grad=False)
        self.gate_up_w = nn.Parameter(torch.empty(2 * cfg.intermediate_size, cfg.hidden_size), requires_grad=False)
        self.down_w = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size), requires_grad=False)
        self.in_norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.post_norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.qkv = self.o = self.gate_up = self.down = None  # Linear kernels, built after loading

    def build_kernels(self) -> None:
        """Wrap the loaded weights in Linear kernels (which may hold packed/fp32 forms of them)."""
        self.qkv = Linear(self.qkv_w, self.qkv_b)
        self.o = Linear(self.o_w)
        self.gate_up = Linear(self.gate_up_w)
        self.down = Linear(self.down_w)

    def forward(self, x, d, rope: RopeStep, k_cache, v_cache, attn: AttentionBackend, meta):
        """x: the residual stream [T, hidden]; d: the previous layer's MLP output [T, hidden], not yet added to x
        (None before the first layer). Returns (x, d) in the same sense: the layer's output is x + d. Deferring
        each add to the norm after it fuses the two (`add_rms_norm`, which may add into x in place)."""
        cfg = self.cfg
        if d is None:
            h = rms_norm(x, self.in_norm, cfg.rms_norm_eps)
        else:
            x, h = add_rms_norm(x, d, self.in_norm, cfg.rms_norm_eps)
        qkv = self.qkv(h)  # [T, q + 2kv]
        T = x.shape[0]
        H, Hkv = cfg.num_heads, cfg.num_kv_heads
        # the native attention kernels take q in fp32: rotated straight into it when that runs fused, and there
        # k and v go straight into the caches where the backend takes them stored (k comes back None then)
        store = (k_cache, v_cache, meta.slot_mapping) if attn.takes_stored_kv else None
        # q [T, H, D]; k [T, Hkv, D], or None once stored
        q, k = Rotary.rotate_qk(qkv, rope, H, Hkv, cfg.head_dim, fp32_q=attn.fp32_q, store=store)
        v = None if k is None else qkv[:, self.q_size + self.kv_size :].reshape(T, Hkv, cfg.head_dim)  # [T, Hkv, D]
        a = attn.forward(q, k, v, k_cache, v_cache, meta, scale=cfg.head_dim**-0.5)  # [T, H, D], the model dtype
        x, h = add_rms_norm(x, self.o(a.reshape(T, self.q_size)), self.post_norm, cfg.rms_norm_eps)  # [T, hidden]
        return x, self.down(silu_mul(self.gate_up(h)))  # gate_up: [T, 2I]


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.lm_head = self.embed if cfg.tie_word_embeddings else nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False
        )
        self.rope = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position, dtype, self.device)
        # chosen for a pool holding K/V in the model dtype; `use_kv_format` / `set_batch_invariant` choose again for
        # another pool format or mode (the engine's runner calls both). Assign another backend
        # (`select_backend(..., tiled=False)`, `SdpaBackend`) before preparing a step for it.
        self.attn: AttentionBackend = _attention(cfg, dtype, self.device)
        self.kv_format: KVFormat = resolve("auto", dtype)  # the cache format `attn` was chosen for
        self.batch_invariant = False

    def use_kv_format(self, fmt: KVFormat) -> None:
        """Attend over a pool of this format from now on (`kv/quant.py`): re-selects the attention backend when the
        format is not the one it has. Mutates `attn`; call before preparing a step over such a pool."""
        if fmt != self.kv_format:
            self.attn = _attention(self.cfg, self.dtype, self.device, fmt, self.batch_invariant)
            self.kv_format = fmt

    def set_batch_invariant(self, on: bool) -> None:
        """Make every token's hidden states, K/V and logits independent of the batch it is computed in (its chunk,
        the other sequences of the step), as in a recompute: the Linear kernels' one-GEMM mode and the tiled
        attention kernel for every span. Sessions then store the bits a recompute would, which a quantized cache
        needs for stateful == stateless (its rounding turns 1e-7 differences into whole steps). Slower decode.
        Mutates every Linear's mode and `attn`."""
        if on == self.batch_invariant:
            return
        self.batch_invariant = on
        for layer in self.layers:
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if lin is not None:
                    lin.batch_invariant = on
        if getattr(self, "lm_head_kernel", None) is not None:
            self.lm_head_kernel.batch_invariant = on
        self.attn = _attention(self.cfg, self.dtype, self.device, self.kv_format, on)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype=torch.float32, device="cpu"):
        model = _build(cls, cfg, dtype, device)
        model.load_hf_state(state)
        return model

    def load_hf_state(self, sd: dict[str, torch.Tensor]) -> None:
        cfg = self.cfg
        put = lambda t: t.to(dtype=self.dtype, device=self.device).contiguous()  # noqa: E731
        self.embed = nn.Parameter(put(sd["model.embed_tokens.weight"]), requires_grad=False)
        self.norm = nn.Parameter(put(sd["model.norm.weight"]), requires_grad=False)
        if cfg.tie_word_embeddings or "lm_head.weight" not in sd:
            self.lm_head = self.embed
        else:
            self.lm_head = nn.Parameter(put(sd["lm_head.weight"]), requires_grad=False)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            g = lambda n: sd[p + n]  # noqa: E731
            layer.qkv_w = nn.Parameter(put(torch.cat([g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"), g("self_attn.v_proj.weight")])), requires_grad=False)
            if cfg.qkv_bias:
                layer.qkv_b = nn.Parameter(put(torch.cat([g("self_attn.q_proj.bias"), g("self_attn.k_proj.bias"), g("self_attn.v_proj.bias")])), requires_grad=False)
            layer.o_w = nn.Parameter(put(g("self_attn.o_proj.weight")), requires_grad=False)
            layer.gate_up_w = nn.Parameter(put(torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")])), requires_grad=False)
            layer.down_w = nn.Parameter(put(g("mlp.down_proj.weight")), requires_grad=False)
            layer.in_norm = nn.Parameter(put(g("input_layernorm.weight")), requires_grad=False)
            layer.post_norm = nn.Parameter(put(g("post_attention_layernorm.weight")), requires_grad=False)
            layer.build_kernels()
        self.lm_head_kernel = Linear(self.lm_head, large_batch_fp32=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVPool, meta) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]. Writes K/V of all T tokens.
        meta: `self.attn.prepare(...)` for this step."""
        x, d = self.embed[input_ids], None  # [T, hidden]: a gather, so a fresh tensor the layers may add into
        rope = self.rope.step(positions)
        for i, layer in enumerate(self.layers):
            x, d = layer(x, d, rope, kv.k_cache[i], kv.v_cache[i], self.attn, meta)
        return add_rms_norm(x, d, self.norm, self.cfg.rms_norm_eps)[1]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32."""
        return self.lm_head_kernel(hidden).float()


def _build(cls, cfg, dtype, device):
    # Parameters are created empty on the meta device and replaced by load_hf_state,
    # so building a 0.5B model allocates no throwaway memory.
    with torch.device("meta"):
        m = cls(cfg, dtype, "meta")
    m.device = torch.device(device)
    m.rope = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position, dtype, m.device)
    m.attn = _attention(cfg, dtype, m.device)  # kv_format and batch_invariant as __init__ set them
    return m


def _attention(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               fmt: KVFormat | None = None, batch_invariant: bool = False) -> AttentionBackend:
    return select_backend(device, dtype, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, kv_format=fmt,
                          batch_invariant=batch_invariant)
