"""Bad inputs that used to slip through, refused before training with one line that names the
file or path, exit code 2, no traceback: a binary profile, a duplicate key, an empty profile, a
checkpoint directory that cannot be written or has no room, a machine too small for the plan.
In-process (launch/train.py's main); the start-up cases that need a process of their own
(SIGTERM, a rendezvous that never completes, 70b on this machine) are in
tests/test_start_up_processes.py."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from apt.core.config import ConfigError, load_profile
from apt.trainops.distributed.plan import make_plan
from apt.trainops.reliability.preflight import FAIL, OK, WARN, checkpoint_dir_check, memory_check
from tests._profiles import AUTO_LAYOUT_70B

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("apt_launch_train", REPO / "launch" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)   # at collection: its imports' warnings stay out of capsys


def _refused(argv, capsys) -> str:
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("apt: error: "), err
    return err


SHORT_RUN = ["--set", "training.max_steps=1", "--set", "training.warmup_steps=0",
             "--set", "training.eval_interval=0", "--set", "training.eval_batches=1",
             "--set", "data.max_corpus_bytes=100000", "--set", "output.sample_tokens=0"]
PROFILE_FILES = [
    # (id, bytes, what the line must say)
    ("binary", bytes(range(256)) * 4, "not a UTF-8 text file"),
    ("duplicate-top-level", b"extends: tiny\ntraining:\n  max_steps: 5\ntraining:\n  seed: 3\n",
     "duplicate key 'training' (first at line 2)"),
    ("duplicate-nested", b"extends: tiny\ntraining:\n  max_steps: 5\n  max_steps: 50\n",
     "duplicate key 'max_steps' (first at line 3)"),
    ("empty", b"", "the profile is empty"),
    ("comments-only", b"# training:\n#   max_steps: 5\n", "the profile is empty"),
]


@pytest.mark.parametrize("case", PROFILE_FILES, ids=[c[0] for c in PROFILE_FILES])
def test_profile_file_refused_with_one_line(case, tmp_path, capsys):
    _, content, expected = case
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    # Should the file slip through, the run it starts is one short step.
    err = _refused(["--profile", str(path), *SHORT_RUN, "--set", f"output.dir={tmp_path}"],
                   capsys)
    assert f"{path}: " in err and expected in err, err
    assert not dist.is_initialized()   # refused before any process group


def test_duplicate_key_in_a_parent_profile_names_the_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text("extends: tiny\nmodel: {num_layers: 2, num_layers: 3}\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml.*duplicate key 'num_layers'"):
        load_profile(tmp_path / "child.yaml")


def test_unwritable_checkpoint_dir_refused_before_the_model(tmp_path, capsys):
    # /sys refuses mkdir even to root (a read-only disk for this purpose).
    target = "/sys/apt-checkpoints"
    err = _refused(["--profile", "tiny", *SHORT_RUN,
                    "--set", "training.checkpoints.save_interval=10",
                    "--set", f"training.checkpoints.dir={target}",
                    "--set", f"output.dir={tmp_path}"], capsys)
    assert f"{target}: checkpoints cannot be written there" in err, err
    assert not dist.is_initialized() and not list(tmp_path.iterdir())   # nothing started


def test_checkpoint_disk_without_room_for_one_checkpoint():
    """7b's plan (no model is built) against /dev/shm: both numbers on the line. A tiny run's
    checkpoint fits the same disk."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    big = load_profile("7b", ["training.checkpoints.save_interval=100"])
    plan = make_plan(big, 1, 1, device_type="cpu")
    free = shutil.disk_usage(shm).free
    if free >= plan.checkpoint_bytes:
        pytest.skip(f"/dev/shm has room for a 7b checkpoint here ({free} bytes free)")
    check = checkpoint_dir_check(big, plan, shm / "apt-checkpoints")
    assert check.status == FAIL and check.source == str(shm / "apt-checkpoints")
    assert f"{free / 2**30:.1f} GiB free" in check.detail
    assert f"needs {plan.checkpoint_bytes / 2**30:.1f} GiB" in check.detail
    tiny = load_profile("tiny", ["training.checkpoints.save_interval=100"])
    assert checkpoint_dir_check(tiny, make_plan(tiny, 1, 1, device_type="cpu"),
                                shm / "apt-checkpoints").status in (OK, WARN)


def test_plan_too_big_for_this_machine_unless_overridden():
    # 70b's own layout (TP4 PP4 CP2) is refused on one process before memory is looked at
    # (tests/test_config.py): give it back `strategy: auto` to reach the host-memory check
    cfg = load_profile("70b", list(AUTO_LAYOUT_70B))
    plan = make_plan(cfg, 1, 1, device_type="cpu")
    refused = memory_check(cfg, plan, processes_per_node=1)
    need = plan.memory.total / 2**30
    assert refused.status == FAIL and f"needs {need:.1f} GiB" in refused.detail, refused
    assert "available" in refused.detail and "hardware.memory_check=false" in refused.detail
    unchecked = load_profile("70b", [*AUTO_LAYOUT_70B, "hardware.memory_check=false"])
    overridden = memory_check(unchecked, plan, 1)
    assert overridden.status == WARN and "starting anyway" in overridden.detail
    tiny = load_profile("tiny")
    assert memory_check(tiny, make_plan(tiny, 1, 1, device_type="cpu"), 1).status == OK
