"""Hugging Face interop: APT <-> transformers Llama / Mixtral with equal logits (real models,
tiny sizes, one process)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from apt.core.config import ModelConfig  # noqa: E402
from apt.model.architectures import APTModel  # noqa: E402
from apt.trainops.interop import export_hf, import_hf, import_hf_to_weights  # noqa: E402
from apt.trainops.checkpoints import load_model_weights, save_model_weights  # noqa: E402


TINY = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=96, vocab_size=384, max_seq_len=64, rope_base=50000.0,
                   norm_eps=1e-6)
TOLERANCE = 1e-4
MAX_DIFFS = {}  # case -> max |logit difference|, printed at the end (pytest -s)


def _tokens(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 24), generator=g)


@torch.no_grad()
def _apt_logits(model, tokens):
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None).float()


@torch.no_grad()
def _hf_logits(hf_model, tokens):
    hf_model.eval()
    return hf_model(input_ids=tokens).logits.float()


def _perturbed_apt_model(cfg, seed=1):
    """Random init, plus non-trivial norm weights (they start at 1) and a larger router so
    that expert choice matters."""
    torch.manual_seed(seed)
    model = APTModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
    return model


def _check(case, apt_logits, hf_logits):
    diff = (apt_logits - hf_logits).abs().max().item()
    MAX_DIFFS[case] = diff
    print(f"\n{case}: max |logit diff| = {diff:.3e}")
    assert apt_logits.shape == hf_logits.shape
    assert diff < TOLERANCE, f"{case}: {diff}"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_llama_matches_transformers(tmp_path, tied):
    cfg = ModelConfig(**{**TINY.__dict__, "tie_embeddings": tied})
    model = _perturbed_apt_model(cfg)
    out = export_hf(model, cfg, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"],
            config["rms_norm_eps"], config["tie_word_embeddings"]) == (2, 96, 384, 1e-6, tied)
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert theta == 50000.0 and config["dtype"] == "float32"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    tokens = _tokens(cfg.vocab_size)
    _check(f"export llama {'tied' if tied else 'untied'}",
           _apt_logits(model, tokens), _hf_logits(hf_model, tokens))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_llama_from_transformers(tmp_path, tied):
    torch.manual_seed(2)
    hf_config = transformers.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=20000.0, tie_word_embeddings=tied)
    hf_model = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():  # HF initialises norms to 1: make them matter
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / "hf")
    cfg, model = import_hf(tmp_path / "hf", APTModel)
    assert (cfg.kv_heads, cfg.ffn_size, cfg.rope_base, cfg.norm_eps, cfg.tie_embeddings) == \
        (2, 96, 20000.0, 1e-5, tied)
    tokens = _tokens(384, seed=3)
    _check(f"import llama {'tied' if tied else 'untied'}",
           _apt_logits(model, tokens), _hf_logits(hf_model, tokens))


def test_mixtral_export_and_import(tmp_path):
    """Megatron's default router (top-k logits, then softmax over them) gives Mixtral's
    weights (softmax over all experts, top-k, renormalise): no router option needed."""
    cfg = ModelConfig(**{**TINY.__dict__, "num_experts": 4, "moe_top_k": 2})
    model = _perturbed_apt_model(cfg, seed=4)
    out = export_hf(model, cfg, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    tokens = _tokens(cfg.vocab_size, seed=5)
    apt_logits = _apt_logits(model, tokens)
    _check("export mixtral", apt_logits, _hf_logits(hf_model, tokens))
    # And back: transformers' own save_pretrained of that model -> import -> same logits.
    hf_model.save_pretrained(tmp_path / "hf2")
    cfg2, model2 = import_hf(tmp_path / "hf2", APTModel)
    assert (cfg2.num_experts, cfg2.moe_top_k) == (4, 2)
    _check("import mixtral (round trip)", _apt_logits(model2, tokens), apt_logits)


def test_export_from_weights_directory_and_import_to_weights(tmp_path):
    """A dist_checkpointing weights directory (what every layout writes; TP2 x PP2 ones load
    into one process the same way, see the parallel matrix) exports to HF; an HF directory
    imports to a weights directory that training.init_from loads."""
    cfg = TINY
    model = _perturbed_apt_model(cfg, seed=6)
    save_model_weights([model], tmp_path / "weights")
    # Small shards: the sharded layout (index.json) that large models get, both directions.
    out = export_hf(tmp_path / "weights", cfg, tmp_path / "hf", max_shard_bytes=200_000,
                    model_class=APTModel)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokens = _tokens(cfg.vocab_size, seed=7)
    apt_logits = _apt_logits(model, tokens)
    _check("export from weights dir", apt_logits, _hf_logits(hf_model, tokens))

    imported_cfg = import_hf_to_weights(out, tmp_path / "imported", APTModel)
    assert imported_cfg.num_layers == cfg.num_layers
    fresh = APTModel(imported_cfg)
    load_model_weights([fresh], tmp_path / "imported")
    _check("hf -> weights dir -> APT", _apt_logits(fresh, tokens), apt_logits)


def test_export_bf16_keeps_dtype(tmp_path):
    model = _perturbed_apt_model(TINY, seed=8)
    out = export_hf(model, TINY, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_cli_export_and_import(tmp_path):
    from apt.cli import main
    from apt.core.config import load_profile
    cfg = load_profile("tiny", ["model.num_layers=2"]).model
    model = _perturbed_apt_model(cfg, seed=9)
    save_model_weights([model], tmp_path / "weights")
    assert main(["export-hf", "--profile", "tiny", "--set", "model.num_layers=2",
                 "--weights", str(tmp_path / "weights"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    fresh = APTModel(cfg)
    load_model_weights([fresh], tmp_path / "back")
    tokens = _tokens(cfg.vocab_size, seed=10)
    _check("cli export -> import", _apt_logits(fresh, tokens), _apt_logits(model, tokens))


def test_unsupported_hf_config_is_refused(tmp_path):
    from apt.core.config import ConfigError
    from apt.trainops.interop import model_config_from_hf
    base = dict(model_type="llama", hidden_size=64, num_attention_heads=4,
                num_hidden_layers=2, intermediate_size=96, vocab_size=384)
    with pytest.raises(ConfigError, match="RoPE scaling 'yarn'"):
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    with pytest.raises(ConfigError, match="model_type"):
        model_config_from_hf({**base, "model_type": "gpt2"})


def test_export_from_a_tp2_checkpoint(tmp_path):
    """Weights saved by a real 2-process TP2 layout export to HF with the TP2 model's logits."""
    from pathlib import Path
    from apt.core.config import load_profile
    from tests._launch import run_distributed
    worker = Path(__file__).parent / "workers" / "hf_tp2_save.py"
    run_distributed(worker, 2, ["--weights", str(tmp_path / "weights"),
                                "--logits", str(tmp_path / "logits.pt")], timeout=120)
    saved = torch.load(tmp_path / "logits.pt", weights_only=True)
    cfg = load_profile("tiny", ["model.num_layers=2"]).model
    out = export_hf(tmp_path / "weights", cfg, tmp_path / "hf", model_class=APTModel)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    _check("export from TP2 checkpoint", saved["logits"].float(),
           _hf_logits(hf_model, saved["tokens"]))


def test_export_of_a_trained_run_has_its_tokenizer_and_stops_at_eos(tmp_path):
    """``trainops export-hf`` of a tiny trained run: AutoTokenizer loads the exported byte
    tokenizer and round-trips like APT's, config.json / generation_config.json carry APT's
    end-of-document id (256, not Llama's 2), and generate() stops there."""
    from apt.cli import main
    from apt.core.config import load_profile
    from apt.trainops.data import ByteTokenizer
    from apt.trainops.trainers import Trainer
    sets = ["model.num_layers=2", "training.max_steps=2", "training.warmup_steps=1",
            "data.max_corpus_bytes=200000", "training.eval_batches=1", "output.sample_tokens=0",
            "monitoring.plots=false", f"output.dir={tmp_path}"]
    trainer = Trainer.from_config(load_profile("tiny", sets))
    trainer.train()
    run = trainer.artifacts.run_dir
    out = tmp_path / "hf"
    args = ["export-hf", "--profile", "tiny", "--weights", str(run / "model" / "dist"),
            "--out", str(out)]
    assert main(args + [a for s in sets[:1] for a in ("--set", s)]) == 0
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == 256
    assert config["pad_token_id"] == 257
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    apt_tok = ByteTokenizer()
    for text in ["def f(x):\n\treturn x  # ünïcode ✓", "", "   "]:
        ids = hf_tok.encode(text)
        assert ids == apt_tok.encode(text).tolist()
        assert hf_tok.decode(ids + [256], skip_special_tokens=True) == apt_tok.decode(ids) == text
    assert hf_tok.eos_token_id == 256 and hf_tok.pad_token_id == 257

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([hf_tok.encode("def ")])
    everything, forced = list(range(config["vocab_size"])), prompt.shape[1] + 3

    def allowed(batch, ids):   # APT's end-of-document token as the 4th new token
        return [256] if ids.shape[0] == forced else everything
    with torch.no_grad():
        free = model.generate(prompt, max_new_tokens=12, do_sample=False)
        stopped = model.generate(prompt, max_new_tokens=12, do_sample=False,
                                 prefix_allowed_tokens_fn=allowed)
    # generation_config.json's eos ends it right there (Llama's default 2 would not).
    assert stopped.shape[1] == forced + 1 and stopped[0, -1].item() == 256
    assert torch.equal(stopped[0, :-1], free[0, :prompt.shape[1] + 3])


def test_exported_bpe_and_sentencepiece_tokenizers_encode_like_apt(tmp_path):
    import sentencepiece
    from apt.trainops.data.tokenizers.tokenizer import SentencePieceTokenizer, train_bpe
    corpus = ["def add(a, b):\n    return a + b", "hello world, the quick brown fox"] * 40
    (tmp_path / "c.txt").write_text("\n".join(corpus))
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), vocab_size=30,
                                             model_prefix=str(tmp_path / "sp"), minloglevel=2)
    tokenizers = [train_bpe(corpus, 300, tmp_path / "bpe" / "tokenizer.json"),
                  SentencePieceTokenizer(tmp_path / "sp.model")]
    for i, tok in enumerate(tokenizers):
        tok.save_pretrained(tmp_path / f"out{i}")
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / f"out{i}")
        assert hf_tok.eos_token_id == tok.eod_id and hf_tok.pad_token_id == tok.pad_id
        for text in ["def add(a, b):\n    return a + b", "the brown fox  ", "hello"]:
            ids = hf_tok.encode(text, add_special_tokens=False)
            assert ids == tok.encode(text).tolist(), (tok.name, text)
            assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids), tok.name
