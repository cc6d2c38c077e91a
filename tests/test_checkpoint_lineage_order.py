"""Retention and auto-resume judge a checkpoint by what it holds (issue 27, points 2-4): its
directory's number must be its step, a rewind starts a branch (nothing deleted), a time written
inside a checkpoint never outranks the run's own lineage, a checkpoint never decides where the
run writes, and another run's files are never removed or overwritten."""
import json
import shutil
import time
from pathlib import Path

import pytest

from apt.trainops.checkpoints import CheckpointError, CheckpointManager
from apt.trainops.checkpoints.manifest import MANIFEST, write_manifest


@pytest.fixture(scope="module")
def model():
    from apt.model.architectures import APTModel
    from apt.trainops.runtime.process_groups import ensure_runtime
    ensure_runtime()
    return APTModel(hidden_size=32, num_layers=1, num_attention_heads=2, num_query_groups=1,
                    ffn_hidden_size=64, vocab_size=384, max_seq_len=16)


def _resume(manager, resume=None):
    from apt.trainops.trainers.checkpointing import resolve_resume
    return resolve_resume(manager, resume, auto_resume=resume is None)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _rewrite(ckpt: Path, **changes):
    """A checkpoint's manifest (and state.json's step) changed, consistently rewritten."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if "step" in changes:
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "step": changes["step"]}))
    (ckpt / MANIFEST).unlink()
    write_manifest(ckpt, {**{k: v for k, v in manifest.items() if k not in ("version", "files")},
                          **changes})


def test_a_rewind_starts_a_branch_and_loses_nothing(tmp_path, model, caplog):
    run = CheckpointManager(tmp_path, keep_last_n=10)
    for step in (3, 4, 5, 6):
        run.save(model=model, step=step)
    rewind = CheckpointManager(tmp_path, keep_last_n=1)
    with caplog.at_level("WARNING"):
        assert _resume(rewind, tmp_path / "checkpoint-3").step == 3
    moved = [line for line in caplog.text.splitlines() if "moved to" in line]
    assert len(moved) == 1 and "went on to step 6" in moved[0], caplog.text
    assert _names(tmp_path / "superseded") == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    rewind.save(model=model, step=4)
    rewind.save(model=model, step=5)
    assert _names(tmp_path) == ["checkpoint-5", "superseded"]      # keep_last_n: 1
    assert rewind.lineage == run.lineage
    old = CheckpointManager(tmp_path / "superseded")
    assert [(e["name"], e["ok"]) for e in old.list()] == [
        ("checkpoint-6", True), ("checkpoint-5", True), ("checkpoint-4", True)]


def test_a_renamed_copy_is_refused_and_never_counted(tmp_path, model, caplog):
    run = CheckpointManager(tmp_path, keep_last_n=2)
    for step in (3, 6):
        run.save(model=model, step=step)
    shutil.copytree(tmp_path / "checkpoint-6", tmp_path / "checkpoint-100")   # same lineage
    again = CheckpointManager(tmp_path, keep_last_n=2)
    with caplog.at_level("WARNING"):
        assert _resume(again).path == tmp_path / "checkpoint-6"
    assert f"refusing {tmp_path / 'checkpoint-100'}: holds step 6, not 100" in caplog.text
    with pytest.raises(CheckpointError, match="checkpoint-100: holds step 6, not 100"):
        CheckpointManager(tmp_path).load("checkpoint-100")
    again.save(model=model, step=7)
    again.save(model=model, step=8)
    assert _names(tmp_path) == ["checkpoint-100", "checkpoint-7", "checkpoint-8"]
    listed = {e["name"]: e for e in again.list()}
    assert not listed["checkpoint-100"]["ok"] and "holds step 6" in \
        listed["checkpoint-100"]["reason"]


def test_a_future_commit_time_never_outranks_the_runs_lineage(tmp_path, model):
    run = CheckpointManager(tmp_path, save_interval=2)
    for step in (2, 4):
        run.save(model=model, step=step)
    foreign = tmp_path / "checkpoint-6"
    shutil.copytree(tmp_path / "checkpoint-4", foreign)
    _rewrite(foreign, step=6, lineage="f" * 16, committed_at=time.time() + 30 * 365 * 86400)
    assert CheckpointManager(tmp_path).list()[0]["ok"]            # a sound checkpoint
    restart = CheckpointManager(tmp_path, save_interval=2)
    restart.last_step = 5                                         # never saves step 6
    assert _resume(restart).path == tmp_path / "checkpoint-4" and restart.lineage == run.lineage
    # A run that would save step 6 is refused at its start, in one line, not at that save.
    restart = CheckpointManager(tmp_path, save_interval=2)
    restart.last_step = 8
    with pytest.raises(CheckpointError) as refused:
        _resume(restart)
    message = str(refused.value)
    assert message.startswith(f"{foreign}: this run would save step 6 there") and \
        "lineage ffff" in message and "\n" not in message
    # A malformed newest manifest: auto-resume falls back, and the start is refused likewise.
    shutil.rmtree(foreign)
    (tmp_path / "checkpoint-4" / MANIFEST).write_text("{")
    restart = CheckpointManager(tmp_path, save_interval=2)
    restart.last_step = 4
    with pytest.raises(CheckpointError, match=r"checkpoint-4: this run would save step 4 there"
                                              r".*no readable manifest"):
        _resume(restart)
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-4"]    # nothing touched


def test_only_this_lineages_temporary_directories_are_removed(tmp_path, model):
    run = CheckpointManager(tmp_path)
    run.save(model=model, step=1)
    theirs = tmp_path / ".tmp-checkpoint-9-0123456789abcdef-00000000"   # in flight elsewhere
    mine = tmp_path / f".tmp-checkpoint-2-{run.lineage}-00000000"       # this run's crash
    for directory in (theirs, mine):
        directory.mkdir()
        (directory / "shard").write_text("x")
    run.save(model=model, step=2)
    assert theirs.is_dir() and not mine.exists()


def test_the_run_directory_comes_from_the_profile(tmp_path, caplog):
    from apt.core.config import load_profile
    from apt.trainops.checkpoints.verification import CheckpointState
    from apt.trainops.trainers.checkpointing import resumed_run_dir
    cfg = load_profile("tiny", [f"output.dir={tmp_path / 'out'}"])
    own = tmp_path / "out" / "tiny-20260101-000000"
    elsewhere = tmp_path / "victim" / "tiny-20260101-000000"
    for directory in (own, elsewhere):
        directory.mkdir(parents=True)

    def state(run_dir):   # a checkpoint elsewhere: <tmp>/ckpts/checkpoint-1
        return CheckpointState(path=tmp_path / "ckpts" / "checkpoint-1", step=1,
                               state={"step": 1, "run_dir": run_dir}, manifest={})
    assert resumed_run_dir(state(str(own)), cfg) == own
    beside = tmp_path / "tiny-20260101-000000"             # beside the checkpoint's directory
    beside.mkdir()
    assert resumed_run_dir(state(str(beside)), cfg) == beside
    with caplog.at_level("WARNING"):
        assert resumed_run_dir(state(str(elsewhere)), cfg) is None
        assert resumed_run_dir(state(str(tmp_path / "out" / "config-dir")), cfg) is None
    lines = [line for line in caplog.text.splitlines() if "records run directory" in line]
    assert len(lines) == 2 and str(elsewhere) in lines[0], caplog.text
