"""Runs that die and come back: SIGKILL at random points, SIGTERM preemption, and resuming a
checkpoint on another parallel layout. Real processes through launch/train.py."""
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
SMALL = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=32",
         "data.seq_length=32", "data.max_corpus_bytes=200000", "training.batch_size=8",
         "training.warmup_steps=2", "training.log_interval=1", "training.eval_interval=0",
         "training.eval_batches=2", "output.sample_tokens=0"]


def _args(overrides):
    out = [str(TRAIN), "--profile", "tiny"]
    for item in SMALL + overrides:
        out += ["--set", item]
    return out


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _records(output_dir: Path) -> dict:
    """step -> record, later runs overriding earlier ones (a resumed run redoes steps)."""
    effective = {}
    for run in sorted(p for p in output_dir.iterdir() if (p / "metrics.jsonl").exists()):
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                effective[record["step"]] = record
    return effective


def _run(cmd, timeout=600):
    # Its own process group: a hung run is killed with every worker torchrun started.
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {out[-2000:]}{err[-4000:]}")
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return out


# Twelve: each attempt pays a process start (~10 s on CI's 2 cores); twenty took 3.5 minutes.
KILLS = 12


def _newest_checkpoint(checkpoints: Path) -> int:
    """The step of the newest committed checkpoint (0: none yet)."""
    return max((int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")), default=0)


class _LineCounter:
    """Reads a run's stdout in a thread (so it never blocks the pipe) and counts its step and
    checkpoint lines, for waiting on 'n more lines from now'."""

    def __init__(self, stream):
        self.count, self._changed = 0, threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            if line.startswith(("step ", "checkpoint |")):
                with self._changed:
                    self.count += 1
                    self._changed.notify_all()
        with self._changed:
            self.count = float("inf")   # the stream ended: nothing more to wait for
            self._changed.notify_all()

    def wait_for_more(self, n: int, proc) -> None:
        with self._changed:
            target = self.count + n
            while self.count < target and proc.poll() is None:
                self._changed.wait(0.1)


def test_sigkill_twelve_times_then_same_losses(tmp_path):
    """Killed with SIGKILL at random moments (some in the middle of a save) and auto-resumed
    each time, the run ends with exactly the losses of an uninterrupted run."""
    steps = 100
    common = [f"training.max_steps={steps}", "training.checkpoints.save_interval=3",
              "training.checkpoints.keep_last_n=2", "training.checkpoints.auto_resume=true"]
    reference = tmp_path / "reference"
    _run([sys.executable, *_args(common + [f"output.dir={reference}"])])
    expected = {s: r["loss"] for s, r in _records(reference).items()}
    assert sorted(expected) == list(range(1, steps + 1))

    out, rng = tmp_path / "killed", random.Random(7)
    kills, mid_save, resumed_from = 0, 0, []
    checkpoints = out / "tiny-checkpoints"
    while kills < KILLS:
        before = set(checkpoints.glob(".tmp-checkpoint-*"))   # earlier kills' leftovers
        resume_point = _newest_checkpoint(checkpoints)
        # Its own process group: the kill takes its helper processes too, as a node crash would.
        proc = subprocess.Popen([sys.executable, *_args(common + [f"output.dir={out}"])],
                                env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        # Wait for events, not for a count of lines: first a checkpoint committed by this
        # attempt (a checkpoint-N directory newer than the resume point: every attempt makes
        # progress however slow the machine; counting lines alone once killed all 12 attempts
        # before any commit on a loaded machine), then 0-4 more step/checkpoint lines (so 12
        # attempts do not finish the 100 steps) and a random instant: often inside a save.
        lines = _LineCounter(proc.stdout)
        while _newest_checkpoint(checkpoints) <= resume_point and proc.poll() is None:
            time.sleep(0.02)
        lines.wait_for_more(rng.randint(0, 4), proc)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += bool(set(checkpoints.glob(".tmp-checkpoint-*")) - before)   # this run's save
        resumed_from.append(_newest_checkpoint(checkpoints))
    final = _run([sys.executable, *_args(common + [f"output.dir={out}"])], timeout=900)
    assert "Traceback" not in final
    got = {s: r["loss"] for s, r in _records(out).items()}
    print(f"{kills} kills, {mid_save} during a save, resumed from steps {resumed_from}")
    assert kills == KILLS and mid_save >= 1
    assert resumed_from == sorted(resumed_from) and resumed_from[-1] > 0   # it made progress
    assert got == expected    # bit-identical: same weights, optimizer, data order, RNG


def test_sigterm_saves_at_step_boundary_and_exits_75(tmp_path):
    cmd = [sys.executable, *_args(["training.max_steps=200", f"output.dir={tmp_path}",
                                   "training.checkpoints.save_interval=0"])]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "preempted" in out
    (checkpoint,) = (tmp_path / "tiny-checkpoints").glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 3 <= step < 200 and (checkpoint / "manifest.json").exists()


def _launch(nproc, overrides, out, resume=None):
    extra = ["--resume", str(resume)] if resume else []
    cmd = [sys.executable, *_args(overrides + [f"output.dir={out}"]), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *cmd[1:]]
    return _run(cmd, timeout=600)


HYBRID = ["training.distributed.strategy=hybrid"]


def _initial_weights(directory):
    """One set of initial weights for every layout (each layout would initialise its own)."""
    from apt.core.config import load_profile
    from apt.model.architectures import APTModel
    from apt.trainops.checkpoints import save_model_weights
    from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
    cfg = load_profile("tiny", SMALL)
    setup_distributed(plan=None)
    seed_everything(cfg.training.seed)
    save_model_weights([APTModel(cfg.model)], directory)
    return directory


STEPS = ["training.max_steps=6", "training.checkpoints.save_interval=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One set of initial weights for every layout, and the uninterrupted one-process run."""
    root = tmp_path_factory.mktemp("reference")
    init = _initial_weights(root / "init")
    _launch(1, STEPS + [f"training.init_from={init}"], root / "ref")
    return init, _records(root / "ref")


@pytest.mark.parametrize("first,second", [
    ((4, HYBRID + ["training.distributed.tensor_parallel=2",
                   "training.distributed.pipeline_parallel=2", "training.micro_batch_size=2"]),
     (2, HYBRID + ["training.distributed.engine=megatron"])),
    ((2, ["training.distributed.zero_stage=2"]),
     (1, ["training.distributed.zero_stage=1"])),
    # Optimizer state split over DP (distributed optimizer, ZeRO-3) is saved by its owners;
    # replicated state (ZeRO-0, Megatron without the distributed optimizer) by one of them.
    ((2, HYBRID + ["training.distributed.engine=megatron"]),
     (2, HYBRID + ["training.distributed.tensor_parallel=2"])),
    # Loaded a few parameters at a time: the two pipeline stages need different numbers of
    # collective loads.
    ((2, ["training.distributed.strategy=fsdp"]),
     (2, HYBRID + ["training.distributed.pipeline_parallel=2", "training.micro_batch_size=2",
                   "training.checkpoints.load_batch_mib=0.05"])),
    ((2, ["training.distributed.zero_stage=0"]),
     (2, HYBRID + ["training.distributed.engine=megatron", "training.distributed.zero_stage=0"])),
], ids=["tp2xpp2-to-dp2-megatron", "dp2-zero2-to-dp1-zero1", "dp2-megatron-to-tp2",
        "dp2-zero3-to-pp2-small-load-batches", "dp2-zero0-to-dp2-megatron-zero0"])
def test_resume_on_another_layout(tmp_path, reference, first, second):
    """Save on one layout, resume on another: the losses and the samples of every step match
    an uninterrupted run (optimizer state is saved in model space and reshards on load, across
    ZeRO stages and the DeepSpeed and Megatron engines)."""
    init, expected = reference
    steps = STEPS + [f"training.init_from={init}"]
    _launch(first[0], steps + first[1], tmp_path / "a")
    for step, record in _records(tmp_path / "a").items():
        assert abs(record["loss"] - expected[step]["loss"]) < 1e-5, step
    checkpoint = tmp_path / "a" / "tiny-checkpoints" / "checkpoint-3"
    resumed_out = _launch(second[0], steps + second[1], tmp_path / "b", resume=checkpoint)
    assert "step 4/6" in resumed_out
    # The resumed run continues in the first run's directory (its state.json names it):
    # steps 4-6 there were superseded and trained again by the resumed run.
    assert not list((tmp_path / "b").glob("*/metrics.jsonl"))
    resumed = _records(tmp_path / "a")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["sample_digest"] == expected[step]["sample_digest"], step
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) < 1e-5, (
            step, resumed[step]["loss"], expected[step]["loss"])


def test_background_writer_dies_with_its_trainer(tmp_path):
    """SIGKILL of the trainer alone (not its process group), while a checkpoint is being
    written in the background: the forked writer and its helpers die with it instead of writing
    on into a directory the restarted run will clean up."""
    import psutil
    # A state large enough (about 0.3 GiB) that the write is still running when we look.
    big = ["model.hidden_size=512", "model.num_layers=8", "model.num_attention_heads=8",
           "model.ffn_hidden_size=1408", "data.num_workers=0", "training.max_steps=1000",
           "training.checkpoints.save_interval=2", f"output.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, *_args(big)], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if "writing in the background" in line:
                break
        trainer = psutil.Process(proc.pid)
        # Forked processes share the trainer's command line (spawned ones, e.g. Megatron's
        # result-queue manager, do not).
        forked = [p for p in trainer.children(recursive=True)
                  if p.cmdline() == trainer.cmdline()]
        assert forked, "no background writer was running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(forked, timeout=10)
        assert not alive, f"writer processes outlived the trainer: {alive}"
        # Killed, not finished: an orphan would have completed the write and left its entries.
        unfinished = list(tmp_path.glob("tiny-checkpoints/.tmp-checkpoint-*"))
        assert unfinished and not list(unfinished[0].glob(".parts/rank-*.json"))
    finally:
        # Cleanup only: usually every process of the group is gone by now (the writers and the
        # checkpoint results-queue server die with the trainer), and killpg finds none.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
