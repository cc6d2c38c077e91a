"""O1Trainer (GRPO) on real Megatron-core / DeepSpeed layouts, against one process.

One module fixture saves initial weights and trains the one-process reference in this
process: 4 steps, 4 completions per prompt sampled at temperature 1, two rewards (exact-match
and a continuous user function, so groups are never all alike), num_iterations 2 (old-policy
log-probs and the clipped ratio are live), a KL penalty (beta > 0: a reference is held), DAPO's
global token normalisation. One 2-process launch (DP2 ZeRO-2, DP2 ZeRO-3, TP2, TP2+SP, PP2)
must give the same per-step losses and metrics within 1e-5 and the same greedy answers. A run
resumed from a checkpoint in the middle of a round (its rollouts saved with it) continues
bit-identically; bad inputs are refused before the first step.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from apt.core.config import ConfigError, load_profile
from apt.model.architectures import APTModel
from apt.trainops.checkpoints import CheckpointError, save_model_weights
from apt.trainops.data.errors import DataError
from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
from apt.trainops.trainers import O1Trainer
from tests._launch import run_distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "workers" / "train_layouts.py"
TOLERANCE = 1e-5
HYBRID = "training.distributed.strategy=hybrid"
STEPS = 4
REWARDS = ("[{name: exact_match, weight: 1.0}, "
           "{name: 'tests.workers.grpo_rewards:byte_mean', weight: 0.5}]")


def write_prompts(path: Path, n: int = 100, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return path


def _common(tmp, init, steps=STEPS):
    return ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=40",
            "data.corpus=prompts", f"data.path={tmp / 'prompts.jsonl'}", "data.val_fraction=0.2",
            "data.seq_length=40", "training.objective=grpo",
            "training.batch_size=8", "training.micro_batch_size=2",
            f"training.max_steps={steps}", "training.warmup_steps=1",
            "training.learning_rate=3e-3", "training.min_learning_rate=3e-4",
            "training.log_interval=1", "training.eval_interval=0",
            "training.grpo.num_generations=4", "training.grpo.max_new_tokens=6",
            "training.grpo.num_iterations=2", "training.grpo.beta=0.05",
            "training.grpo.loss_type=dapo", "training.grpo.eval_prompts=6",
            f"training.grpo.rewards={REWARDS}",
            "output.sample_tokens=0", f"output.dir={tmp / 'runs'}",
            f"training.init_from={init}"]


def _steps(history):
    return [{k: v for k, v in r.items() if k in ("loss", "grad_norm") or "/" in k
             and not k.startswith("time/")} for r in history]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    write_prompts(tmp / "prompts.jsonl")
    init = tmp / "init"
    cfg = load_profile("tiny", _common(tmp, init) + ["training.init_from=null"])
    setup_distributed(plan=None)
    seed_everything(cfg.training.seed)
    save_model_weights([APTModel(cfg.model)], init)
    trainer = O1Trainer.from_config(load_profile("tiny", _common(tmp, init)))
    summary = trainer.train()
    dataset = trainer.eval_dataloader.dataset
    greedy = trainer.greedy_answers(dataset.get_batch(range(6)).prompts)
    return tmp, {"history": trainer.history, "summary": summary, "greedy": greedy}


def test_first_step_has_no_kl_and_sampler_matches_trainer(reference_run):
    _, run = reference_run
    first = run["history"][0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)       # the policy is the reference
    assert first["clip_ratio/region"] == 0.0                   # ratio 1 before any update
    assert first["sampler_logp_diff"] < 1e-5                  # fp32: sampler == trainer
    assert abs(first["sampler_ratio"] - 1.0) < 1e-5
    assert first["frac_reward_zero_std"] < 1.0 and first["reward_std"] > 0
    assert run["history"][1]["kl"] > 0    # step 2 trains on the same rollouts, moved policy
    for key in ("reward", "rewards/exact_match", "rewards/tests.workers.grpo_rewards:byte_mean",
                "entropy", "completion_length", "completion_clipped_ratio",
                "time/generation_s", "time/training_s"):
        assert key in first, key
    assert run["summary"]["val_prompts"] == 6


def _launch(tmp, nproc, layouts):
    spec = {"common": _common(tmp, tmp / "init"), "layouts": {
        name: {"set": overrides, "greedy_probe": 6} for name, overrides in layouts.items()}}
    spec_path, out = tmp / f"spec{nproc}.json", tmp / f"out{nproc}.json"
    spec_path.write_text(json.dumps(spec))
    run_distributed(WORKER, nproc, ["--spec", str(spec_path), "--out", str(out)], timeout=900)
    return json.loads(out.read_text())


def test_layouts_match_one_process(reference_run):
    tmp, run = reference_run
    results = _launch(tmp, 2, {
        "dp2_zero2": ["training.distributed.zero_stage=2"],
        "dp2_zero3": ["training.distributed.strategy=fsdp"],
        "tp2": [HYBRID, "training.distributed.tensor_parallel=2"],
        "tp2_sp": [HYBRID, "training.distributed.tensor_parallel=2",
                   "training.distributed.sequence_parallel=true"],
        "pp2": [HYBRID, "training.distributed.pipeline_parallel=2"]})
    reference = _steps(run["history"])
    failures = []
    for name, result in results.items():
        steps = [{"loss": loss, "grad_norm": norm, **metrics} for loss, norm, metrics
                 in zip(result["losses"], result["grad_norms"], result["metrics"])]
        steps = [{k: v for k, v in s.items() if not k.startswith("time/")} for s in steps]
        diff = max(abs(a[k] - b[k]) / (1 if k != "grad_norm" else max(abs(a[k]), 1.0))
                   for a, b in zip(reference, steps) for k in a)
        same_greedy = result["greedy"] == run["greedy"]
        print(f"{name:10s} engine {result['engine']:9s} max |step metric - one process| "
              f"{diff:.2e} greedy identical {same_greedy}")
        if len(steps) != STEPS or diff > TOLERANCE or not same_greedy:
            failures.append(f"{name}: {diff:.2e} greedy {same_greedy}")
        for key in ("val_reward", "val_accuracy", "val_completion_length"):
            assert result["eval"][key] == pytest.approx(run["summary"][key], abs=1e-9), name
    assert not failures, failures


def test_resume_inside_a_round_continues_bit_identically(reference_run, tmp_path):
    """num_iterations 2: the checkpoint after step 3 falls inside the round of steps 3-4, so
    it holds that round's rollouts; the resumed step 4 equals the uninterrupted one."""
    tmp, run = reference_run
    common = _common(tmp, tmp / "init") + [
        f"training.checkpoints.dir={tmp_path / 'ckpt'}", "training.checkpoints.save_interval=3",
        "training.checkpoints.async_save=false", f"output.dir={tmp_path}"]
    whole = O1Trainer.from_config(load_profile("tiny", common))
    whole.train()
    assert _steps(whole.history) == _steps(run["history"])   # checkpointing changes nothing
    third = tmp_path / "ckpt" / "checkpoint-3"
    resumed = O1Trainer.from_config(load_profile("tiny", common), resume_from_checkpoint=third)
    assert resumed.step == 3
    resumed.train()
    assert _steps(resumed.history) == _steps(whole.history)[3:]
    # without the round's rollouts it cannot continue: refused, never silently resampled
    again = O1Trainer.from_config(load_profile("tiny", common), resume_from_checkpoint=third)
    with pytest.raises(CheckpointError, match="inside a round.*another layout"):
        again.load_rank_state({"micro_batches": []}, str(third), same_layout=False)
    for state in (third / "trainer").glob("state-rank-*.pt"):
        state.unlink()    # the manifest lists them: a checkpoint that lost one is refused
    with pytest.raises(CheckpointError, match="missing file trainer/state-rank-00000.pt"):
        O1Trainer.from_config(load_profile("tiny", common), resume_from_checkpoint=third)


def test_dynamic_sampling_fills_the_batch_with_groups_that_differ_and_resumes(reference_run,
                                                                              tmp_path):
    """A 0/1 reward whose groups of 4 are sometimes all alike: each round draws prompt
    batches until every group differs (at most 3 draws), logs what it dropped, and a run
    resumed from a checkpoint continues on the same prompts (the cursor counts the extra
    draws)."""
    tmp, _ = reference_run
    common = _common(tmp, tmp / "init", steps=6) + [
        "training.grpo.rewards=[{name: 'tests.workers.grpo_rewards:first_byte_even'}]",
        "training.grpo.num_iterations=1", "training.grpo.beta=0.0",
        "training.grpo.dynamic_sampling_max_draws=3",
        f"training.checkpoints.dir={tmp_path / 'ckpt'}", "training.checkpoints.save_interval=3",
        "training.checkpoints.async_save=false", f"output.dir={tmp_path}"]
    whole = O1Trainer.from_config(load_profile("tiny", common))
    whole.train()
    history = whole.history
    for r in history:
        assert r["sampling/groups_sampled"] == 2 * r["sampling/draws"]   # 2 prompts a draw
        assert r["sampling/groups_dropped"] + r["sampling/groups_all_equal_kept"] == \
            round(r["sampling/groups_all_equal"] * r["sampling/groups_sampled"])
        # the batch's groups all differ unless the cap was reached
        if r["sampling/draws"] < 3:
            assert r["frac_reward_zero_std"] == 0.0 and r["sampling/groups_all_equal_kept"] == 0
    assert any(r["sampling/groups_dropped"] > 0 for r in history), history
    assert any(r["sampling/draws"] > 1 for r in history)
    # off: one draw per round, the all-alike groups stay in the batch
    plain = O1Trainer.from_config(load_profile("tiny", common + [
        "training.grpo.dynamic_sampling=false", "training.checkpoints.save_interval=0"]))
    plain.train()
    assert all(r["sampling/draws"] == 1 and r["sampling/groups_dropped"] == 0
               for r in plain.history)
    assert max(r["frac_reward_zero_std"] for r in plain.history) > 0
    resumed = O1Trainer.from_config(load_profile("tiny", common),
                                    resume_from_checkpoint=tmp_path / "ckpt" / "checkpoint-3")
    resumed.train()
    keys = ("sample_digest", "loss", "sampling/draws", "reward")
    assert [{k: r[k] for k in keys} for r in resumed.history] == \
        [{k: r[k] for k in keys} for r in history[3:]]


def test_bad_inputs_are_refused_before_the_first_step(reference_run, tmp_path):
    tmp, _ = reference_run
    common = _common(tmp, tmp / "init")
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.name.*'nope:missing' does not resolve"):
        O1Trainer.from_config(load_profile("tiny", common + [
            "training.grpo.rewards=[{name: 'nope:missing'}]"]))
    with pytest.raises(ConfigError, match="num_generations: 3 does not divide"):
        load_profile("tiny", common + ["training.grpo.num_generations=3"])
    no_answer = tmp_path / "no-answer.jsonl"
    no_answer.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(10)))
    with pytest.raises(DataError, match="no 'answer' field"):
        O1Trainer.from_config(load_profile("tiny", common + [f"data.path={no_answer}"]))
    # the CLI: one line, exit code 2
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--profile", "tiny"]
        + sum((["--set", o] for o in common + [f"data.path={no_answer}"]), []),
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no 'answer' field" in proc.stderr and "Traceback" not in proc.stderr


def test_a_raising_reward_scores_zero_and_is_counted(reference_run, tmp_path):
    tmp, _ = reference_run
    trainer = O1Trainer.from_config(load_profile("tiny", _common(tmp, tmp / "init", steps=1) + [
        "training.grpo.rewards=[{name: exact_match}, "
        "{name: 'tests.workers.grpo_rewards:raises_on_ascii'}]",
        f"output.dir={tmp_path}"]))
    trainer.train()
    record = trainer.history[0]
    assert record["reward_failures"] > 0
    assert record["rewards/tests.workers.grpo_rewards:raises_on_ascii"] < 1.0
