"""APTLargeModel.from_pretrained: a run directory, a dist_checkpointing directory (its own
apt_model.json, or the run's config.yaml), a Hugging Face Llama directory, and the error for
anything else (one process)."""
import dataclasses
import json

import pytest
import torch
import yaml

from apt.core.config import APTConfig, ModelConfig, config_to_dict
from apt.model.architectures import APTLargeModel, APTModel
from apt.trainops.checkpoints.model_weights import MODEL_CONFIG_FILE
from apt.trainops.interop import PretrainedError
from apt.trainops.checkpoints import save_model_weights

TINY = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=96, vocab_size=384, max_seq_len=64, rope_base=50000.0,
                   tie_embeddings=True)


def _model(seed=3):
    model = APTModel(TINY)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)   # not the init: weights must load
    return model


def _same_weights(a, b):
    sa = {k: v for k, v in a.state_dict().items() if isinstance(v, torch.Tensor)}
    sb = {k: v for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _run_dir(tmp_path, model):
    """What a training run leaves: config.yaml (the resolved config) and model/dist."""
    run = tmp_path / "run"
    run.mkdir()
    resolved = yaml.safe_dump(config_to_dict(APTConfig(model=TINY)), sort_keys=False)
    (run / "config.yaml").write_text("# config hash x\n" + resolved)
    save_model_weights([model], run / "model" / "dist")
    return run


def test_run_dir_and_dist_dirs_load_the_saved_weights(tmp_path):
    model = _model()
    run = _run_dir(tmp_path, model)
    dist_dir = run / "model" / "dist"
    assert json.loads((dist_dir / MODEL_CONFIG_FILE).read_text()) == dataclasses.asdict(TINY)
    for path in (run, dist_dir):
        loaded = APTLargeModel.from_pretrained(path)
        assert type(loaded) is APTLargeModel and loaded.arch == TINY
        assert _same_weights(loaded, model)
    # A run's model/dist from before apt_model.json existed: the run's config.yaml serves.
    (dist_dir / MODEL_CONFIG_FILE).unlink()
    assert _same_weights(APTLargeModel.from_pretrained(dist_dir), model)
    # Weights alone, outside a run: their own apt_model.json.
    alone = save_model_weights([model], tmp_path / "weights")
    assert _same_weights(APTModel.from_pretrained(alone), model)
    (alone / MODEL_CONFIG_FILE).unlink()
    with pytest.raises(PretrainedError, match=f"without a model config.*no {MODEL_CONFIG_FILE}"):
        APTModel.from_pretrained(alone)


def test_hugging_face_llama_dir_gives_transformers_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=384, max_position_embeddings=64, rope_theta=50000.0,
        tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    model = APTLargeModel.from_pretrained(tmp_path / "hf")
    assert type(model) is APTLargeModel and model.arch.num_query_groups == 2
    tokens = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval(), hf.eval()
        ours = model(tokens, torch.arange(16).expand(2, 16), None)
        theirs = hf(input_ids=tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["missing", "empty", "other files", "a file"])
def test_anything_else_is_one_error_saying_what_is_accepted_and_what_was_found(tmp_path, case):
    path = tmp_path / "x"
    found = {"missing": "no such file or directory", "empty": "an empty directory",
             "other files": "notes.txt, sub/", "a file": "a file, not a directory"}[case]
    if case == "empty":
        path.mkdir()
    elif case == "other files":
        (path / "sub").mkdir(parents=True)
        (path / "notes.txt").write_text("hi")
    elif case == "a file":
        path.write_text("hi")
    with pytest.raises(PretrainedError) as error:
        APTLargeModel.from_pretrained(path)
    message = str(error.value)
    assert message.startswith(f"{path}: not a pretrained model")
    assert "training run directory" in message and "Hugging Face Llama" in message
    assert message.endswith(f"found {found}") and "\n" not in message
