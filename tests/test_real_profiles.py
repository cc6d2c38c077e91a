"""The real-size profiles of published models (issue 26, point 4): each profile is its model's
published config.json, the plan's parameter count equals transformers' count of that config
exactly, and the memory table's numbers are the hand-calculated ones."""
import io
from contextlib import redirect_stdout

import pytest
import torch

from apt.core.config import load_profile
from apt.core.config.sizing import count_parameters
from apt.trainops.distributed.memory import GIB
from apt.trainops.distributed.plan import make_plan

# The architecture keys of each model's config.json on the Hugging Face Hub (the repository in
# the comment), as published; keys not given take the config class's defaults, as there.
PUBLISHED = {
    "llama3.2-1b": ("LlamaConfig", {   # meta-llama/Llama-3.2-1B
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "attention_bias": False}),
    "qwen2.5-0.5b": ("Qwen2Config", {   # Qwen/Qwen2.5-0.5B (q/k/v bias is Qwen2's, always on)
        "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "sliding_window": 32768, "use_sliding_window": False,
        "max_window_layers": 24}),
    "qwen3-0.6b": ("Qwen3Config", {   # Qwen/Qwen3-0.6B (q/k RMSNorm is Qwen3's, always on)
        "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
        "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
        "sliding_window": None}),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", {   # Qwen/Qwen3-30B-A3B
        "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "router_aux_loss_coef": 0.001}),
    "mistral-7b": ("MistralConfig", {   # mistralai/Mistral-7B-v0.1
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}),
}
# Parameters as the model cards state them (rounded there).
CARD_BILLIONS = {"llama3.2-1b": 1.24, "qwen2.5-0.5b": 0.49, "qwen3-0.6b": 0.6,
                 "qwen3-30b-a3b": 30.5, "mistral-7b": 7.24}


def expected_model_fields(class_name: str, hf: dict) -> dict:
    """The ModelConfig values the published config means (what each profile must say)."""
    scaling = hf.get("rope_scaling") or {}
    sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    fields = {
        "hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "kv_heads": hf["num_key_value_heads"],
        "head_size": hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
        "ffn_hidden_size": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
        "max_seq_len": hf["max_position_embeddings"], "rope_base": hf["rope_theta"],
        "norm_eps": hf["rms_norm_eps"], "tie_embeddings": hf["tie_word_embeddings"],
        "qkv_bias": class_name == "Qwen2Config" or hf.get("attention_bias", False),
        "qk_norm": class_name in ("Qwen3Config", "Qwen3MoeConfig"),
        "sliding_window": sliding,
        "rope_scaling": scaling.get("rope_type", "none"),
        "num_experts": hf.get("num_experts"),
    }
    if scaling:
        fields.update(rope_scaling_factor=scaling["factor"],
                      rope_low_freq_factor=scaling["low_freq_factor"],
                      rope_high_freq_factor=scaling["high_freq_factor"],
                      rope_original_max_seq_len=scaling["original_max_position_embeddings"])
    if hf.get("num_experts"):
        fields.update(moe_top_k=hf["num_experts_per_tok"],
                      moe_ffn_hidden_size=hf["moe_intermediate_size"],
                      moe_norm_topk_prob=hf["norm_topk_prob"],
                      moe_aux_loss_coeff=hf["router_aux_loss_coef"])
    return fields


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_profile_is_the_published_model_and_counts_its_parameters_exactly(name):
    import transformers
    class_name, hf = PUBLISHED[name]
    cfg = load_profile(name)
    m = cfg.model
    assert {k: getattr(m, k) for k in expected_model_fields(class_name, hf)} == \
        expected_model_fields(class_name, hf)
    # transformers' own model of the published config, on the meta device (no memory).
    hf_config = getattr(transformers, class_name)(**hf)
    model_class = getattr(transformers, class_name.replace("Config", "ForCausalLM"))
    with torch.device("meta"):
        model = model_class(hf_config)
    theirs = sum(p.numel() for p in model.parameters())     # a tied weight counts once
    plan = make_plan(cfg, 8, 8)
    # APT keeps the vocabulary unpadded (each of these divides by 8 for TP), so the counts
    # compare as they are.
    assert count_parameters(m).total == plan.params_total == theirs
    assert theirs / 1e9 == pytest.approx(CARD_BILLIONS[name], rel=0.02)
    if m.num_experts:   # active: attention + 8 of 128 experts per layer (the card's "A3B")
        assert plan.params_active / 1e9 == pytest.approx(3.35, abs=0.01)


def test_memory_table_of_qwen25_matches_the_hand_calculation():
    """GRPO of Qwen2.5-0.5B on 8 GPUs (DeepSpeed ZeRO-1, bf16, DP 8), by hand: weights,
    gradients, optimizer, activations of a micro-batch of 4 rows of 4096 tokens, the sampler's
    KV cache for the rank's 8 completions, and the rollouts; then the printed table."""
    from apt.cli import main
    from apt.trainops.distributed.memory_table import memory_table
    cfg = load_profile("qwen2.5-0.5b")
    rows = {(r.objective, r.gpus): r for r in memory_table(cfg, (1, 8))}
    assert all(r.plan is not None for r in rows.values())
    grpo = rows["GRPO", 8].plan
    P = 494_032_768                                          # transformers' count (above)
    assert (grpo.zero_stage, grpo.engine, grpo.dp, grpo.micro_batch, grpo.grad_accum) == \
        (1, "deepspeed", 8, 4, 2)
    mem = grpo.memory
    assert (mem.weights, mem.gradients, mem.optimizer) == (2 * P, 4 * P, 12 * P / 8)
    assert mem.communication == 50_000_000 * 4               # one fp32 reduce bucket
    s, b, h, q, k, f, V, L = 4096, 4, 896, 14 * 64, 2 * 64, 4864, 151936, 24
    # per layer (bytes, bf16): norm in/outputs 8sbh, q/attention out 4sbq, k/v 4sbk,
    # SwiGLU 8sbf (flash attention: no probabilities); fp32 logits 4sbV (GRPO needs them whole)
    layer = 8 * s * b * h + 4 * s * b * q + 4 * s * b * k + 8 * s * b * f
    assert mem.activations == L * layer + 4 * s * b * V
    rows_per_gpu = 64 // 8                                   # 1 prompt x 8 completions
    kv_cache = 2 * L * rows_per_gpu * s * k * 2              # keys + values, bf16
    assert mem.generation == kv_cache + rows_per_gpu * V * (2 + 4)
    assert mem.rollouts == rows_per_gpu * s * (8 + 8 + 4 + 4 + 4)   # + reference log-probs
    assert mem.host_reference == 2 * mem.weights             # beta 0.04: frozen initial weights
    assert mem.total == 18 * P + 12 * P / 8 - 12 * P + mem.rollouts + max(
        mem.activations + mem.communication, mem.generation)
    # the other objectives, relative to SFT: LoRA trains 16 x (in + out) per target per layer
    sft, lora, dpo = (rows[o, 8].plan.memory for o in ("SFT", "LoRA", "DPO"))
    adapters = 16 * ((h + q + 2 * k) + (q + h) + (h + 2 * f) + (f + h)) * L
    assert lora.trainable_per_gpu == adapters and lora.weights == 2 * (P + adapters)
    assert dpo.static == sft.static and dpo.host_reference == 2 * dpo.weights
    assert rows["SFT", 1].plan.memory.optimizer == 12 * P    # nothing to shard on one GPU
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", "--profile", "qwen2.5-0.5b", "--memory-table"]) == 0
    table = {line.split()[0] + line.split()[1]: line.split()
             for line in out.getvalue().splitlines()[-10:-1]}
    assert table["GRPO8"][-3] == f"{mem.total / GIB:.2f}"
    assert table["GRPO8"][-4] == f"{mem.generation / GIB:.2f}"
    assert set(table) == {"objectiveGPUs", *(f"{o}{g}" for o in ("SFT", "LoRA", "DPO", "GRPO")
                                             for g in (1, 8))}
