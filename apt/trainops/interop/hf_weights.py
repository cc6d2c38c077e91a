"""Tensor names and shapes: a full (TP1) Megatron state dict <-> the Hugging Face tensors of a
family (``hf_families.hf_family``).

Weight layout differences (Megatron -> HF):
- ``linear_qkv`` rows (and its bias, Qwen2) are grouped per query group: [q heads of group
  g, k of g, v of g] for g = 0..groups-1; HF keeps separate q/k/v projections. HF's
  ``repeat_kv`` gives query head i the kv head i // (heads / groups), the same grouping.
- ``linear_fc1`` is [gate; up] stacked along rows (SwiGLU ``silu(gate) * up``); HF keeps
  ``gate_proj``/``up_proj`` (Mixtral: ``w1``/``w3``; ``w2`` = ``linear_fc2``).
- RoPE: Megatron's default (non-interleaved, ``rotate_half``) is HF's Llama RoPE, no permutation.
- MoE routing: Megatron's default (softmax score, ``moe_router_pre_softmax=False``) takes the
  top-k logits and softmaxes over them; Mixtral softmaxes over all experts, takes the top-k and
  renormalises. Both give ``exp(l_i) / sum_{j in topk} exp(l_j)``: the same weights.
  Qwen3-MoE without ``norm_topk_prob`` keeps the softmax over all experts: Megatron's
  ``moe_router_pre_softmax``.
- Qwen3's per-head ``q_norm`` / ``k_norm`` are Megatron's ``q_layernorm`` / ``k_layernorm``.
- Gemma's norm weights are stored zero-centred (applied as 1 + w) on both sides: copied as is.
"""
from __future__ import annotations

import torch

from apt.core.config import ConfigError, ModelConfig
from .hf_families import hf_family


def megatron_to_hf(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full (TP1, all layers) Megatron state dict -> HF tensor names of ``hf_family(cfg)``."""
    family = hf_family(cfg)
    heads, groups, head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = state[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = state[m + "pre_mlp_layernorm.weight"]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            qkv = state[m + f"self_attention.linear_qkv.{kind}"]   # [rows, hidden] or [rows]
            rest = qkv.shape[1:]
            q, k, v = qkv.reshape(groups, (heads // groups + 2) * head_dim, *rest).split(
                [heads // groups * head_dim, head_dim, head_dim], dim=1)
            for name, part in (("q", q), ("k", k), ("v", v)):
                out[h + f"self_attn.{name}_proj.{kind}"] = part.reshape(-1, *rest)
        if cfg.qk_norm:
            out[h + "self_attn.q_norm.weight"] = state[m + "self_attention.q_layernorm.weight"]
            out[h + "self_attn.k_norm.weight"] = state[m + "self_attention.k_layernorm.weight"]
        out[h + "self_attn.o_proj.weight"] = state[m + "self_attention.linear_proj.weight"]
        if cfg.num_experts:
            names = _EXPERT_NAMES[family]
            width = cfg.moe_ffn_hidden_size or cfg.ffn_size
            out[h + names["gate"]] = state[m + "mlp.router.weight"]
            for e in range(cfg.num_experts):
                me, he = f"{m}mlp.experts.local_experts.{e}.", f"{h}{names['experts']}.{e}."
                out[he + names["w1"]], out[he + names["w3"]] = \
                    state[me + "linear_fc1.weight"].split(width)
                out[he + names["w2"]] = state[me + "linear_fc2.weight"]
        else:
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = \
                state[m + "mlp.linear_fc1.weight"].split(cfg.ffn_size)
            out[h + "mlp.down_proj.weight"] = state[m + "mlp.linear_fc2.weight"]
    return out


# Per-expert tensor names on disk (what save_pretrained writes, transformers 4.x and 5.x).
_EXPERT_NAMES = {
    "mixtral": {"gate": "block_sparse_moe.gate.weight", "experts": "block_sparse_moe.experts",
                "w1": "w1.weight", "w3": "w3.weight", "w2": "w2.weight"},
    "qwen3_moe": {"gate": "mlp.gate.weight", "experts": "mlp.experts",
                  "w1": "gate_proj.weight", "w3": "up_proj.weight", "w2": "down_proj.weight"},
}


def hf_to_megatron(tensors: dict, cfg: ModelConfig, family: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """HF tensor names -> a full (TP1) Megatron state dict, fp32."""
    t = {k: v.to(torch.float32) for k, v in tensors.items()}
    heads, groups, head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    out = {"embedding.word_embeddings.weight": t.pop("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": t.pop("model.norm.weight")}
    lm_head = t.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = lm_head
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = t.pop(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = t.pop(h + "post_attention_layernorm.weight")
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = (t.pop(h + f"self_attn.{n}_proj.{kind}") for n in "qkv")
            rest = q.shape[1:]
            q = q.reshape(groups, -1, *rest)
            k, v = (x.reshape(groups, head_dim, *rest) for x in (k, v))
            out[m + f"self_attention.linear_qkv.{kind}"] = \
                torch.cat([q, k, v], dim=1).reshape(-1, *rest)
        if cfg.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = t.pop(h + "self_attn.q_norm.weight")
            out[m + "self_attention.k_layernorm.weight"] = t.pop(h + "self_attn.k_norm.weight")
        out[m + "self_attention.linear_proj.weight"] = t.pop(h + "self_attn.o_proj.weight")
        if cfg.num_experts:
            _moe_to_megatron(t, out, m, h, cfg, family or hf_family(cfg))
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [t.pop(h + "mlp.gate_proj.weight"), t.pop(h + "mlp.up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = t.pop(h + "mlp.down_proj.weight")
    unused = [k for k in t if not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ConfigError(f"HF weights APT has no place for: {', '.join(sorted(unused)[:6])}")
    return out


def _moe_to_megatron(t: dict, out: dict, m: str, h: str, cfg: ModelConfig, family: str) -> None:
    # On disk Mixtral and Qwen3-MoE keep one tensor per expert (what save_pretrained writes,
    # 4.x and 5.x); transformers 5 models hold them fused (mlp.experts.gate_up_proj [E, 2F, H],
    # mlp.experts.down_proj [E, H, F]): accept both.
    if h + "mlp.experts.gate_up_proj" in t:
        gate_up, down = t.pop(h + "mlp.experts.gate_up_proj"), t.pop(h + "mlp.experts.down_proj")
        out[m + "mlp.router.weight"] = t.pop(h + "mlp.gate.weight")
        for e in range(cfg.num_experts):
            out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
            out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
        return
    names = _EXPERT_NAMES[family]
    out[m + "mlp.router.weight"] = t.pop(h + names["gate"])
    for e in range(cfg.num_experts):
        he, me = f"{h}{names['experts']}.{e}.", f"{m}mlp.experts.local_experts.{e}."
        out[me + "linear_fc1.weight"] = torch.cat([t.pop(he + names["w1"]),
                                                   t.pop(he + names["w3"])])
        out[me + "linear_fc2.weight"] = t.pop(he + names["w2"])
