"""Launch a multi-process worker script under torchrun (CPU, gloo) for tests.

Workers get their arguments on the command line and report results by writing JSON to a path
passed among those arguments (rank 0 writes).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def run_distributed(
    worker_path: str | os.PathLike, nproc: int, args: list[str], timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run ``worker_path`` on ``nproc`` local processes; raise with the output tail on failure."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # nproc processes share few cores: avoid oversubscription
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)  # an in-process group of this pytest process must not leak in
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone: a rendezvous store on a free port the OS picks (localhost:0), which the
        # workers reuse, so concurrent launches never collide.
        "--standalone", f"--nproc_per_node={nproc}",
        str(worker_path), *args,
    ]
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=_REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise RuntimeError(
            f"{worker_path} ({nproc} procs) timed out after {timeout}s\n"
            f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}"
        ) from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"{worker_path} ({nproc} procs) exited with {proc.returncode}\n"
            f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}"
        )
    return proc
