"""launch/slurm.sbatch run by bash as SLURM would run it, with stand-ins for the SLURM binaries
(``srun``, ``scontrol``: tiny scripts on PATH that record their arguments; srun exits with the
code the test asks for). Checks: the job requeues itself on exit code 75 (preempted) and on
the watchdog's 4 (a bounded number of times) and only then, it runs the repository's .venv python (or APT_PYTHON), and its log path needs no
directory SLURM would not create."""
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"


def _tool(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _submit(tmp: Path, srun_exit: int, python: Path | None = None, restarts: int = 0):
    bin_dir, calls = tmp / "bin", tmp / "calls.txt"
    bin_dir.mkdir(exist_ok=True)
    calls.write_text("")
    _tool(bin_dir / "srun", f'echo "srun $*" >> {calls}\nexit {srun_exit}\n')
    _tool(bin_dir / "scontrol", f'echo "scontrol $*" >> {calls}\n'
                                 f'[ "$1 $2" = "show hostnames" ] && echo node001\nexit 0\n')
    submit = tmp / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    _tool(submit / ".venv" / "bin" / "python", "exit 0\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_CPUS_PER_TASK": "4",
           "SLURM_SUBMIT_DIR": str(submit), "HOME": str(tmp),
           "SLURM_RESTART_COUNT": str(restarts)}
    if python is not None:
        env["APT_PYTHON"] = str(python)
    proc = subprocess.run(["bash", str(SCRIPT), "--profile", "tiny"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=30)
    return proc, calls.read_text().splitlines(), submit


@pytest.mark.parametrize("srun_exit", [75, 0, 1])
def test_requeues_only_when_preempted(tmp_path, srun_exit):
    proc, calls, submit = _submit(tmp_path, srun_exit)
    (srun,) = [c for c in calls if c.startswith("srun")]
    assert f"{submit}/.venv/bin/python launch/train.py" in srun and "--profile tiny" in srun
    assert "training.checkpoints.auto_resume=true" in srun   # a requeued job resumes
    requeues = [c for c in calls if c.startswith("scontrol requeue")]
    if srun_exit == 75:
        assert requeues == ["scontrol requeue 4242"] and proc.returncode == 0, proc.stderr
    else:
        assert requeues == [] and proc.returncode == srun_exit, proc.stderr


@pytest.mark.parametrize("restarts", [0, 3])
def test_a_hang_requeues_a_bounded_number_of_times(tmp_path, restarts):
    """The watchdog's exit code 4: requeued (the next start resumes) up to APT_MAX_REQUEUES."""
    proc, calls, _ = _submit(tmp_path, 4, restarts=restarts)
    requeues = [c for c in calls if c.startswith("scontrol requeue")]
    if restarts < 3:
        assert requeues == ["scontrol requeue 4242"] and proc.returncode == 0, proc.stderr
    else:
        assert requeues == [] and proc.returncode == 4, proc.stderr


def test_apt_python_overrides_and_a_missing_python_is_one_line(tmp_path):
    other = tmp_path / "other-python"
    _tool(other, "exit 0\n")
    proc, calls, _ = _submit(tmp_path, 0, python=other)
    assert proc.returncode == 0 and f"srun --kill-on-bad-exit=1 --cpu-bind=none {other} " \
        in calls[-1]
    proc, calls, _ = _submit(tmp_path, 0, python=tmp_path / "nowhere")
    assert proc.returncode == 2 and not [c for c in calls if c.startswith("srun")]
    assert len(proc.stderr.strip().splitlines()) == 1 and "APT_PYTHON" in proc.stderr


def test_log_path_needs_no_directory():
    """SLURM opens --output before the script runs and creates no directory for it."""
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SCRIPT.read_text(), re.M))
    assert "/" not in directives["output"]
    assert "requeue" in directives
