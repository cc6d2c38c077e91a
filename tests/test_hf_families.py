"""The model families people fine-tune, against transformers' own implementation (issue 26).

Each family's model is built by transformers from its own config class at a small size with
random weights (norms, biases and routers perturbed so that they matter), saved with
``save_pretrained``; APT imports it and must give transformers' logits within 1e-4 (fp32);
``export_hf`` writes the same ``model_type`` and transformers reloads it with the same logits.
Where a feature can be switched off in APT (RoPE scaling, the sliding window, the MoE top-k
normalisation), the same weights without it must NOT match: the sizes make every feature
count. A config.json feature APT cannot represent is refused in one line naming it, and bad
Hugging Face directories (huge dimensions, pickled weights only, an index without a
weight_map) are one line before anything large is allocated. One process, ~10 s.
"""
import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from apt.core.config import ConfigError  # noqa: E402
from apt.model.architectures import APTModel  # noqa: E402
from apt.trainops.interop import export_hf, import_hf, model_config_from_hf  # noqa: E402

TOLERANCE = 1e-4
SEQ = 24
COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6)
ROPE = {"rope_theta": 10000.0}


def _configs():
    """name -> (transformers config, APT ModelConfig changes that switch a feature off)."""
    return {
        # Llama 3.x: the original context (16) is inside the test sequence and a non-default
        # high-frequency factor, so factor, ramp and wavelength bounds all take part.
        "llama3": (transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 256},
                                            rope_parameters={**ROPE, "rope_type": "llama3",
                                                             "factor": 8.0,
                                                             "low_freq_factor": 1.0,
                                                             "high_freq_factor": 2.0,
                                                             "original_max_position_embeddings": 16}),
                   {"rope_high_freq_factor": 4.0}),
        "llama_linear": (transformers.LlamaConfig(**COMMON, rope_parameters={
            **ROPE, "rope_type": "linear", "factor": 4.0}), {"rope_scaling": "none"}),
        "qwen2": (transformers.Qwen2Config(**COMMON), None),          # q/k/v bias
        "qwen3": (transformers.Qwen3Config(**COMMON, head_dim=24), None),   # q/k norm, head_dim
        "qwen3_moe": (transformers.Qwen3MoeConfig(**COMMON, head_dim=24, moe_intermediate_size=40,
                                                  num_experts=4, num_experts_per_tok=2,
                                                  norm_topk_prob=False),
                      {"moe_norm_topk_prob": True}),
        "mistral": (transformers.MistralConfig(**COMMON, sliding_window=5),
                    {"sliding_window": None}),
        # GeGLU (tanh-GELU), norms as 1 + w, embeddings * sqrt(hidden), tied, head_dim
        "gemma": (transformers.GemmaConfig(**COMMON, head_dim=24),
                  [{"scale_embeddings": False}, {"activation": "swiglu"}]),
    }


@torch.no_grad()
def _apt_logits(model, tokens):
    model.eval()
    return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()


@torch.no_grad()
def _hf_logits(model, tokens):
    model.eval()
    return model(input_ids=tokens).logits.float()


def _hf_model(config, seed):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):      # the router: make choices matter
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", list(_configs()))
def test_family_imports_and_exports_with_transformers_logits(tmp_path, family):
    config, feature_off = _configs()[family]
    hf = _hf_model(config, seed=len(family))
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, COMMON["vocab_size"], (2, SEQ),
                           generator=torch.Generator().manual_seed(1))
    theirs = _hf_logits(hf, tokens)

    cfg, model = import_hf(tmp_path / "hf", APTModel)
    ours = _apt_logits(model, tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"\n{family}: import max |logit diff| {diff:.2e}")
    assert diff < TOLERANCE, (family, diff)

    out = export_hf(model, cfg, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == config.model_type, saved["model_type"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == type(hf).__name__
    diff = (_hf_logits(reloaded, tokens) - ours).abs().max().item()
    print(f"{family}: export -> transformers max |logit diff| {diff:.2e}")
    assert diff < TOLERANCE, (family, diff)

    for change in [feature_off] if isinstance(feature_off, dict) else feature_off or []:
        # the feature counts at this size: the same weights without it differ
        off = APTModel(dataclasses.replace(cfg, **change))
        off.load_state_dict(model.state_dict())
        assert (_apt_logits(off, tokens) - theirs).abs().max().item() > 10 * TOLERANCE, change


def test_what_each_family_declares_reaches_the_model_config():
    cfgs = {name: model_config_from_hf(config.to_dict()) for name, (config, _) in
            _configs().items()}
    assert (cfgs["llama3"].rope_scaling, cfgs["llama3"].rope_scaling_factor,
            cfgs["llama3"].rope_high_freq_factor, cfgs["llama3"].rope_original_max_seq_len) == \
        ("llama3", 8.0, 2.0, 16)
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].qk_norm
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_size == 24
    moe = cfgs["qwen3_moe"]
    assert (moe.num_experts, moe.moe_top_k, moe.moe_ffn_hidden_size, moe.moe_norm_topk_prob) == \
        (4, 2, 40, False)
    assert cfgs["mistral"].sliding_window == 5
    assert (cfgs["gemma"].activation, cfgs["gemma"].norm_zero_centered,
            cfgs["gemma"].scale_embeddings, cfgs["gemma"].tie_embeddings) == \
        ("geglu", True, True, True)
    # Qwen's window only when use_sliding_window, and on every layer (max_window_layers 0).
    qwen = transformers.Qwen2Config(**COMMON, sliding_window=7).to_dict()
    assert model_config_from_hf(qwen).sliding_window is None
    qwen = transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=7,
                                    max_window_layers=0).to_dict()
    assert model_config_from_hf(qwen).sliding_window == 7


BASE = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
            intermediate_size=96, vocab_size=384)


@pytest.mark.parametrize("change,named", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "qwen3_moe", "decoder_sparse_step": 2, "num_experts": 4,
      "moe_intermediate_size": 32}, "decoder_sparse_step"),
    ({"model_type": "qwen3_moe", "mlp_only_layers": [0], "num_experts": 4,
      "moe_intermediate_size": 32}, "mlp_only_layers"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
      "max_window_layers": 1}, "sliding_window on some layers only"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"model_type": "gemma", "hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"hidden_size": "wide"}, "model.hidden_size"),
])
def test_what_apt_cannot_represent_is_refused_in_one_line(change, named):
    with pytest.raises(ConfigError) as error:
        model_config_from_hf({**BASE, **change}, "x/config.json")
    message = str(error.value)
    assert message.startswith("x/config.json: ") and named in message and "\n" not in message


def test_bad_directories_are_one_line_before_allocating(tmp_path, capsys):
    """Huge dimensions: the memory preflight refuses before the model exists; pickled weights
    only, or an index without weight_map: one line (CLI: exit 2), never a traceback."""
    from apt.cli import main
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps({**BASE, "hidden_size": 2 ** 17,
                                                  "intermediate_size": 2 ** 19,
                                                  "num_hidden_layers": 4096}))
    (huge / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"needs about [\d,.]+ GiB .* GiB is available"):
        import_hf(huge, APTModel)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(BASE))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    no_map = tmp_path / "no_map"
    no_map.mkdir()
    (no_map / "config.json").write_text(json.dumps(BASE))
    (no_map / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    for path, named in ((pickled, "pickled weights are never read"), (no_map, "no weight_map"),
                        (huge, "needs about")):
        with pytest.raises(ConfigError, match=named):
            APTModel.from_pretrained(path)
        capsys.readouterr()
        assert main(["import-hf", "--hf", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err


def test_sliding_window_model_honours_packed_documents():
    """SFT packing on a windowed model: two documents packed in one row (block-diagonal mask,
    positions restarting) give each document's logits as if it ran alone, the window applied
    inside each document."""
    from apt.core.config import ModelConfig
    from apt.trainops.data.datasets.tokens import block_causal_mask
    torch.manual_seed(0)
    model = APTModel(ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4,
                                 num_query_groups=2, vocab_size=384, max_seq_len=64,
                                 sliding_window=5)).eval()
    assert "attention_mask" in model.supported_batch_fields
    first, second = torch.randint(0, 384, (1, 14)), torch.randint(0, 384, (1, 10))
    row = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(14), torch.arange(10)])[None]
    mask = block_causal_mask(torch.tensor([[0] * 14 + [1] * 10]))
    with torch.no_grad():
        packed = model(row, positions, mask)
        alone = torch.cat([_apt_logits(model, first), _apt_logits(model, second)], dim=1)
    assert (packed - alone).abs().max().item() < TOLERANCE


def test_the_swiglu_kernel_is_refused_for_a_geglu_model():
    from apt.core.config import ModelConfig
    with pytest.raises(ConfigError, match="model.kernels.*geglu"):
        APTModel(ModelConfig(activation="geglu", kernels=["swiglu"]))
