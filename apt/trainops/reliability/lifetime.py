"""A launched worker's lifetime: it dies with its launcher, and a SIGTERM before the training
loop ends it at once, quietly.

torchrun starts its workers in sessions of their own, so a SIGKILLed launcher leaves them
running: measured here, three workers sat in ``init_process_group`` for more than 10 minutes
waiting for the launcher's store. ``die_with_launcher`` makes the kernel send SIGTERM to the
worker when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and a thread watches the launcher's
pid too: the launcher is not always the parent (``torchrun --no-python wrapper.sh`` makes a
shell the parent, and the shell outlives torchrun). When either is gone the worker gets SIGTERM,
and SIGKILL after ``grace_s`` if it is still alive (the loop turns SIGTERM into a checkpoint and
exit 75, which may take a step).

``exit_on_sigterm_until_loop``: a SIGTERM during start-up (loading, rendezvous, building the
model) ends the process with exit code 75 and one line on rank 0, instead of every rank's
connection tracebacks. It works while the main thread is blocked in C++ (a rendezvous that
waits for a store), where a Python signal handler would not run: the handler's wake-up byte is
read by a thread. Once the training loop installs its own SIGTERM handler (the preemption
guard), this one stands aside.

Only the standard library is imported: launch/train.py calls both first, before torch is
imported (which takes seconds).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

from apt.core.exit_codes import EXIT_PREEMPTED
PR_SET_PDEATHSIG = 1         # linux/prctl.h
DEFAULT_GRACE_S = float(os.environ.get("APT_ORPHAN_GRACE_S", 120))

# What a launcher's command line contains (/proc/<pid>/cmdline, arguments joined by spaces).
LAUNCHERS = ("torchrun", "torch.distributed.run", "torch/distributed/run.py",
             "torch.distributed.launch", "deepspeed", "slurmstepd", "mpirun", "mpiexec")

# Set by a launcher for its workers (not RANK: a one-process group exports that itself):
# torchrun, the deepspeed launcher, srun, Open MPI, MPICH/Intel MPI.
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "CROSS_RANK", "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK",
                "PMI_RANK")

_watched_parent: int | None = None


def launched() -> bool:
    """Started by a launcher, not from a shell: a process run from a shell must outlive it
    when asked to (nohup)."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def _rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def die_with_launcher(grace_s: float = DEFAULT_GRACE_S, poll_s: float = 1.0) -> bool:
    """Arrange for SIGTERM (then SIGKILL after ``grace_s``) when the parent process dies.
    Idempotent; a no-op outside a launcher. Returns whether a watch is in place."""
    global _watched_parent
    if _watched_parent is not None:
        return True
    if not launched():
        return False
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass   # the watch thread below still notices
        if os.getppid() != parent:   # died between getppid and prctl
            _orphaned(parent, grace_s)
    _watched_parent = parent
    launcher = _launcher_ancestor(parent)
    threading.Thread(target=_watch, args=(parent, launcher, grace_s, poll_s), daemon=True,
                     name="apt-launcher-watch").start()
    return True


def _launcher_ancestor(parent: int) -> tuple[int, str] | None:
    """The nearest ancestor whose command line is a known launcher's, with its start time
    (a pid can be reused), when it is not the parent itself; None if there is none."""
    pid = parent
    for _ in range(8):   # a wrapper script or two, never the user's whole process tree
        stat = _stat(pid)
        if stat is None or pid <= 1:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            return None
        if any(name in cmdline for name in LAUNCHERS):
            return None if pid == parent else (pid, stat[1])
        pid = stat[0]
    return None


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) from /proc/<pid>/stat; None when the process is gone (or a
    zombie: dead, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), fields[19])


def _watch(parent: int, launcher: tuple[int, str] | None, grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:
        if launcher is not None:
            stat = _stat(launcher[0])
            if stat is None or stat[1] != launcher[1]:
                _orphaned(launcher[0], grace_s)
        time.sleep(poll_s)
    _orphaned(parent, grace_s)


def _orphaned(parent: int, grace_s: float) -> None:
    """The launcher is gone: SIGTERM to ourselves (start-up: exit 75 at once; the loop: a
    checkpoint at the next step, then exit 75), SIGKILL if that has not ended us in time."""
    if _rank0():
        print(f"apt: launcher (pid {parent}) is gone: stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    print(f"apt: still running {grace_s:g} s after the launcher died: killing this rank",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _startup_sigterm(signum, frame) -> None:
    """Runs when the main thread gets to Python; the reader thread usually exits first."""
    _exit_during_startup()


def _exit_during_startup() -> None:
    if _rank0():
        print("apt: stopped by SIGTERM during start-up, before the first step: nothing to save "
              f"(exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    os._exit(EXIT_PREEMPTED)


def exit_on_sigterm_until_loop() -> None:
    """Install the start-up SIGTERM behaviour (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, _startup_sigterm)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def read_wakeups():
        while True:
            for signum in os.read(read_fd, 64):
                # Still ours: start-up. Otherwise the loop's handler owns SIGTERM now.
                if (signum == signal.SIGTERM
                        and signal.getsignal(signal.SIGTERM) is _startup_sigterm):
                    _exit_during_startup()

    threading.Thread(target=read_wakeups, daemon=True, name="apt-startup-sigterm").start()
