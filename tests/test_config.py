"""Profiles: inheritance, overrides, hashing, and bad profiles refused with one clear line."""
import subprocess
import sys
from pathlib import Path

import pytest

from apt.cli import main as apt_main
from apt.core.config import ConfigError, load_profile

REPO = Path(__file__).resolve().parents[1]
SIZE_PROFILES = ["tiny", "standard", "125m", "1b", "7b", "13b", "70b", "moe", "moe-tiny",
                 "llama3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b", "qwen3-30b-a3b", "mistral-7b"]


@pytest.mark.parametrize("name", SIZE_PROFILES)
def test_shipped_profiles_load(name):
    cfg = load_profile(name)
    assert cfg.name == name and len(cfg.config_hash) == 16


def test_extends_and_overrides_and_hash():
    base = load_profile("7b")
    child = load_profile("13b")
    assert child.sources[0].endswith("7b.yaml") and child.sources[-1].endswith("13b.yaml")
    assert child.training.distributed.recompute == "selective"   # inherited from 7b
    assert child.model.hidden_size == 5120 and base.model.hidden_size == 4096
    same = load_profile("tiny")
    assert same.config_hash == load_profile("tiny").config_hash   # stable
    changed = load_profile("tiny", ["training.learning_rate=1e-3", "training.max_steps=70"])
    assert changed.training.learning_rate == 1e-3 and changed.training.max_steps == 70
    assert changed.config_hash != same.config_hash
    # YAML 1.1 reads 3e-5 as a string: float fields accept it.
    assert load_profile("tiny", ["training.min_learning_rate=3e-5"]).training.min_learning_rate == 3e-5


def test_real_architecture_numbers():
    from apt.core.config.sizing import count_parameters
    billions = {name: count_parameters(load_profile(name).model).total / 1e9
                for name in ("1b", "7b", "13b", "70b", "moe")}
    assert billions["1b"] == pytest.approx(1.24, abs=0.01)     # Llama-3.2-1B
    assert billions["7b"] == pytest.approx(6.74, abs=0.01)     # Llama-2-7B
    assert billions["13b"] == pytest.approx(13.02, abs=0.01)   # Llama-2-13B
    assert billions["70b"] == pytest.approx(70.55, abs=0.05)   # Llama-3-70B
    assert billions["moe"] == pytest.approx(46.70, abs=0.05)   # Mixtral-8x7B


# (description, profile YAML body or None, --set overrides, plan args, text the line must name)
BAD = [
    ("unknown key with hint", None, ["training.lr=1e-4"], [], "did you mean 'learning_rate'"),
    ("unknown section", "extends: tiny\nmodle: {hidden_size: 64}\n", [], [], "did you mean 'model'"),
    ("wrong type", "extends: tiny\nmodel: {num_layers: four}\n", [], [], "model.num_layers"),
    ("negative lr", None, ["training.learning_rate=-1"], [], "training.learning_rate: must be > 0"),
    ("TP not dividing heads", None, ["training.distributed.strategy=hybrid",
                                     "training.distributed.tensor_parallel=3"], [],
     "tensor_parallel: 3 does not divide"),
    ("layers not divisible by PP", None, ["training.distributed.pipeline_parallel=3"], [],
     "pipeline_parallel"),
    ("hidden not divisible by heads", None, ["model.hidden_size=130"], [], "model.hidden_size"),
    ("kv heads not dividing heads", None, ["model.num_query_groups=3"], [], "model.num_query_groups"),
    ("strategy typo", None, ["training.distributed.strategy=fsdpp"], [], "did you mean 'fsdp'"),
    ("sequence longer than model", None, ["data.seq_length=256"], [], "data.seq_length"),
    ("warmup beyond max steps", None, ["training.max_steps=10"], [], "training.warmup_steps"),
    ("ZeRO stage 4", None, ["training.distributed.zero_stage=4"], [], "must be <= 3"),
    ("fp16 on CPU", None, ["training.precision=fp16"], ["--device", "cpu"], "training.precision"),
    ("global batch not divisible by DP", None, ["training.batch_size=33"],
     ["--gpus-per-node", "2"], "training.batch_size"),
    ("extends cycle", "extends: SELF\n", [], [], "cycle"),
    ("extends a missing profile", "extends: nonexistent_profile\n", [], [], "profile not found"),
    ("invalid YAML", "model: {hidden_size: 64\n", [], [], "invalid YAML at line"),
    ("not a boolean", "extends: tiny\nmodel: {tie_embeddings: maybe}\n", [], [], "true or false"),
    ("ZeRO-3 with pipeline", None, ["training.distributed.pipeline_parallel=2",
                                    "training.distributed.zero_stage=3"],
     ["--gpus-per-node", "2"], "cannot be combined with pipeline"),
    ("sequence parallel without TP", None, ["training.distributed.sequence_parallel=true"], [],
     "needs tensor_parallel > 1"),
    ("MoE with TP and no SP", None, ["model.num_experts=4", "training.distributed.strategy=hybrid",
                                     "training.distributed.tensor_parallel=2"],
     ["--gpus-per-node", "2"], "needs sequence_parallel: true"),
    ("target never checked", None, ["training.target.metric=val_loss",
                                    "training.eval_interval=0"], [], "training.target.metric"),
    ("target mode typo", None, ["training.target.mode=maximum"], [], "training.target.mode"),
    ("vocab smaller than tokenizer", None, ["model.vocab_size=200"], [], "model.vocab_size"),
    ("TP x PP not dividing world", None, ["training.distributed.tensor_parallel=2",
                                          "training.distributed.pipeline_parallel=2"],
     ["--gpus-per-node", "6"], "does not divide the world size 6"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_profile_is_one_line_exit_2(case, tmp_path, capsys):
    _, body, overrides, plan_args, expected = case
    profile = "tiny"
    if body is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(body.replace("SELF", str(path)))
        profile = str(path)
    argv = ["plan", "--profile", profile, *plan_args]
    for item in overrides:
        argv += ["--set", item]
    assert apt_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("apt: error: ") and expected in err, err
    if body is not None and "missing" not in case[0]:
        assert "bad.yaml" in err   # names the file


def test_error_names_the_file_that_set_the_key(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("extends: tiny\ntraining: {learning_rate: -0.5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\nmodel: {num_layers: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_profile(child)
    assert "parent.yaml" in str(err.value) and "training.learning_rate" in str(err.value)


def test_launcher_refuses_bad_profile_before_any_process_group():
    result = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--profile", "tiny",
                             "--set", "training.distributed.tensor_parallel=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # one line: Megatron's import-time "Transformer Engine and Apex are not installed"
    # warnings are kept off the console (apt/core/logging.py)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "tensor_parallel" in result.stderr.strip().splitlines()[-1]
    assert "process group" not in result.stdout + result.stderr


def test_plan_cli_70b_and_refused_layout(capsys):
    ok = subprocess.run([sys.executable, "-m", "apt", "plan", "--profile", "70b", "--nodes", "8",
                         "--gpus-per-node", "8"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "hybrid: TP=4 PP=4 DP=2 CP=2 SP" in ok.stdout        # the profile's searched layout
    assert "memory/GPU" in ok.stdout and "optimizer" in ok.stdout
    # 48 GPUs do not hold that layout's 32-GPU model-parallel groups: one line naming the key
    assert apt_main(["plan", "--profile", "70b", "--nodes", "6", "--gpus-per-node", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("apt: error: training.distributed.tensor_parallel: TP x PP x CP = 4 x 4 x 2 = "
                   "32 does not divide the world size 48"), err
    refused = subprocess.run([sys.executable, "-m", "apt", "plan", "--profile", "70b", "--nodes",
                              "1", "--gpus-per-node", "8", "--set",
                              "training.distributed.pipeline_parallel=3"],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
