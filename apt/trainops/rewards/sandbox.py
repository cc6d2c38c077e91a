"""Run untrusted, model-written Python code with tests in a caged subprocess.

``run_python(code, tests, limits)`` starts ``python -I -S -u sandbox_child.py`` in a new session
(its own process group) in a fresh temporary directory, with an environment that holds nothing
of ours (no tokens, no paths but /usr/bin:/bin). The child cages itself (namespaces, rlimits,
its own uid, an audit hook: see sandbox_child.py), runs the code and then each test, and reports
per test. The parent waits at most ``timeout_s`` of wall-clock time, then kills the process
group and, when the child ran under a uid of its own, every process of that uid (so nothing the
program forked survives, even outside the group), and removes the directory.

What is guaranteed depends on what the kernel lets us do; ``SandboxResult.layers`` says what was
applied. As root (this machine, measured in tests/test_rewards.py): no network at all, writes
only to the working directory and private tmpfs (other files are the ordinary permissions of a
uid that owns nothing), CPU/memory/file-size/process limits that count only this program, and
no process left behind. Not root: the rlimits, the timeout and the process-group kill, a network
namespace only where unprivileged user namespaces are allowed (the process limit then counts only
the sandbox's processes; otherwise the user's running tasks plus the limit), and otherwise the
audit hook, which a determined program can get around (it runs in the same interpreter); and a
process that calls setsid() can outlive the run. The program also runs in the same interpreter as its
tests, so it could forge their results: this is containment, not a proof of correctness.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .sandbox_child import EXIT_MEMORY, EXIT_OK

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
TAIL_CHARS = 2000
# Root runs each program under a uid of its own, from a range no distribution assigns; the
# process id spreads concurrent trainers apart, the counter concurrent sandboxes of one process.
_UID_BASE, _UID_SLOTS = 2_100_000_000, 64
_counter = itertools.count()


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0         # wall clock, then the whole process group is killed
    cpu_s: int | None = None        # RLIMIT_CPU; None: the wall-clock timeout rounded up
    memory_mb: int = 512            # RLIMIT_AS (address space, not resident memory)
    file_size_mb: int = 16          # RLIMIT_FSIZE, also bounds the captured stdout
    max_processes: int = 16         # RLIMIT_NPROC (threads count too)
    max_open_files: int = 64        # RLIMIT_NOFILE
    tmpfs_mb: int = 64              # size of each private tmpfs (root: working dir, /tmp, ...)
    namespaces: bool = True         # network/mount namespaces where the kernel allows them
    own_uid: bool = True            # root: run as a uid of its own
    audit_hook: bool = True         # the in-interpreter tripwire (sandbox_child.py)

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "file_size_mb", "max_processes", "max_open_files",
                     "tmpfs_mb") + (("cpu_s",) if self.cpu_s is not None else ()):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox {name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    passed: int                     # tests that ran without raising
    total: int                      # tests given
    reason: str                     # ok | timeout | memory | error | killed | setup
    detail: str = ""                # the exception or signal behind a reason other than ok
    stdout_tail: str = ""           # the last TAIL_CHARS of stdout and stderr together
    layers: tuple[str, ...] = field(default=())  # the cage actually applied
    wall_s: float = 0.0

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else float(self.reason == "ok")


def run_python(code: str, tests: list[str] | tuple[str, ...] = (),
               limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code``, then each test (Python statements, e.g. ``assert f(2) == 4``) in its
    namespace, in the sandbox. Never raises for anything the code does."""
    tests = list(tests)
    workdir = tempfile.mkdtemp(prefix="apt-sandbox-")
    uid = _sandbox_uid() if limits.own_uid and os.geteuid() == 0 else None
    start = time.monotonic()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as results:
            cpu_s = limits.cpu_s or math.ceil(limits.timeout_s)
            job = {"code": code, "tests": tests, "dir": workdir, "uid": uid,
                   "result_fd": results.fileno(), "namespaces": limits.namespaces,
                   "audit": limits.audit_hook, "cpu_s": cpu_s,
                   "memory_mb": limits.memory_mb, "file_size_mb": limits.file_size_mb,
                   "max_processes": limits.max_processes, "max_open_files": limits.max_open_files,
                   "tmpfs_mb": limits.tmpfs_mb}
            returncode, timed_out = _run_child(job, out, results, uid, limits.timeout_s)
            results.seek(0)
            lines = results.read().decode(errors="replace").splitlines()
            out.seek(0, os.SEEK_END)
            out.seek(max(0, out.tell() - 4 * TAIL_CHARS))
            tail = out.read().decode(errors="replace")[-TAIL_CHARS:]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(lines, returncode, timed_out, len(tests), tail, time.monotonic() - start)


def _sandbox_uid() -> int:
    return _UID_BASE + (os.getpid() % 50_000) * _UID_SLOTS + next(_counter) % _UID_SLOTS


def _run_child(job, out, results, uid, timeout_s) -> tuple[int | None, bool]:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": job["dir"], "TMPDIR": job["dir"]}
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-u", CHILD], stdin=subprocess.PIPE,
                            stdout=out, stderr=subprocess.STDOUT, cwd=job["dir"], env=env,
                            start_new_session=True, pass_fds=(results.fileno(),))
    timed_out = False
    try:
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BrokenPipeError:  # the child died before reading its job
        pass
    finally:
        # Whatever the program started goes too: its process group, and as root every process
        # of its uid (a child that called setsid() left the group but not the uid).
        _kill_group(proc.pid)
        if uid is not None:
            _kill_uid(uid)
        proc.wait()
    return proc.returncode, timed_out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    # kill(-1) from that uid signals every process of it at once (the kernel walks the task list
    # under its lock, so a fork bomb cannot add processes meanwhile) except the caller itself.
    kill = shutil.which("kill", path="/usr/bin:/bin")
    for _ in range(2):
        if kill:
            subprocess.run([kill, "-KILL", "--", "-1"], user=uid, group=uid, extra_groups=[],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:  # no kill program: find them one by one (the process limit bounds how many)
            for pid in _pids_of_uid(uid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _result(lines, returncode, timed_out, total, tail, wall_s) -> SandboxResult:
    layers, setup, code_status, outcomes = (), None, None, []
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "L":
            layers = tuple(rest.split())
        elif kind == "S":
            setup = rest
        elif kind == "C":
            code_status = rest
        elif kind in ("P", "F", "M"):
            outcomes.append((kind, rest))
    passed = sum(kind == "P" for kind, _ in outcomes)
    common = dict(passed=passed, total=total, stdout_tail=tail, layers=layers, wall_s=wall_s)
    failures = [rest for kind, rest in outcomes if kind == "F"]
    if timed_out:
        return SandboxResult(reason="timeout", detail="wall-clock timeout", **common)
    if returncode == -signal.SIGXCPU:
        return SandboxResult(reason="timeout", detail="CPU time limit", **common)
    if setup is not None or not layers:  # it never got to the program: not the program's fault
        detail = setup or f"exit status {returncode}: {tail.strip()[-300:]}"
        return SandboxResult(reason="setup", detail=f"sandbox setup failed: {detail}", **common)
    if returncode == EXIT_MEMORY or code_status == "memory":
        return SandboxResult(reason="memory", detail="MemoryError", **common)
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        return SandboxResult(reason="killed", detail=f"signal {-returncode} {name}".strip(),
                             **common)
    if code_status not in (None, "ok"):
        return SandboxResult(reason="error", detail=code_status, **common)
    if returncode != EXIT_OK or len(outcomes) < total:
        return SandboxResult(reason="error", detail=f"exit status {returncode} after "
                             f"{len(outcomes)} of {total} tests", **common)
    return SandboxResult(reason="ok", detail=failures[0] if failures else "", **common)
