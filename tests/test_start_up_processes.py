"""Start-up in processes of its own (launch/train.py, real torchrun): SIGTERM before the loop
exits 75 with one line; a rendezvous that never completes fails within the profile's timeout
naming its address; 70b on this machine is refused before the model with both numbers; and
workers die with their launcher when it is SIGKILLed (directly its children, or behind a
wrapper script that outlives it)."""
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests._profiles import AUTO_LAYOUT_70B

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _limit_memory():
    # If the memory refusal ever breaks, building 70b must fail here, not in the OOM killer.
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("apt: ")]


def test_start_up_sigterm_rendezvous_timeout_and_too_small_machine(tmp_path):
    """Three launches at once (each alone would wait mostly for imports)."""
    never, stopped = _free_port(), _free_port()
    # Rank 0 of 2 hosts the store and waits for a rank 1 that never comes.
    rank0 = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    common = ["--profile", "tiny", "--set", f"output.dir={tmp_path}"]
    timeout_run = subprocess.Popen(
        [sys.executable, TRAIN, *common, "--set", "training.distributed.rendezvous_timeout_s=3"],
        env=_env(**rank0, MASTER_PORT=str(never)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    term_run = subprocess.Popen([sys.executable, TRAIN, *common],
                                env=_env(**rank0, MASTER_PORT=str(stopped)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # 70b's own layout (TP4 PP4 CP2) is refused on one process before memory is looked at;
    # with `strategy: auto` back it reaches the host-memory refusal this guards
    auto_layout = [arg for item in AUTO_LAYOUT_70B for arg in ("--set", item)]
    big_run = subprocess.Popen([sys.executable, TRAIN, "--profile", "70b", *auto_layout, "--set",
                                f"output.dir={tmp_path}"], env=_env(), preexec_fn=_limit_memory,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not _listening(stopped) and term_run.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert term_run.poll() is None, term_run.communicate()[1][-3000:]
        time.sleep(1.0)   # inside the rendezvous now, blocked in C++ waiting for rank 1
        sent = time.monotonic()
        term_run.send_signal(signal.SIGTERM)
        _, err = term_run.communicate(timeout=30)
        took = time.monotonic() - sent
        assert term_run.returncode == 75 and took < 10, (term_run.returncode, took, err[-3000:])
        assert "Traceback" not in err and _errors(err) == [
            "apt: stopped by SIGTERM during start-up, before the first step: nothing to save "
            "(exit 75)"], err[-3000:]

        _, err = timeout_run.communicate(timeout=240)
        assert timeout_run.returncode == 1 and "Traceback" not in err, err[-3000:]
        (line,) = _errors(err)
        assert f"rendezvous at 127.0.0.1:{never} did not complete within 3 s" in line, line
        assert "1/2 clients joined" in line, line

        _, err = big_run.communicate(timeout=240)
        assert big_run.returncode == 2 and "Traceback" not in err, err[-3000:]
        (line,) = _errors(err)
        assert "profile 70b: the plan needs" in line and "GiB available" in line, line
    finally:
        for proc in (timeout_run, term_run, big_run):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _torchrun(args: list[str], nproc: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_workers_die_with_their_launcher(tmp_path):
    """SIGKILL torchrun while its workers start: direct children get the kernel's parent-death
    signal; behind a wrapper shell (which outlives torchrun) the launcher watch ends them."""
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\n')   # no exec: sh stays the parent
    wrapper.chmod(0o755)
    train = [TRAIN, "--profile", "tiny", "--set", f"output.dir={tmp_path}"]
    launchers = [_torchrun(train, nproc=2),
                 _torchrun(["--no-python", str(wrapper), *train], nproc=1)]
    workers = []
    try:
        deadline = time.time() + 120
        for launcher, n in zip(launchers, (2, 1)):
            def found():
                return [p for p in psutil.Process(launcher.pid).children(recursive=True)
                        if TRAIN in p.cmdline() and "python" in p.name()]
            while len(found()) < n and time.time() < deadline:
                time.sleep(0.2)
            workers += found()
        assert len(workers) == 3, workers
        time.sleep(3.0)   # the workers are importing torch or waiting in the rendezvous
        assert all(w.is_running() for w in workers)
        for launcher in launchers:
            launcher.kill()
            launcher.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"orphaned workers still running 30 s after the launcher died: {alive}"
    finally:
        for proc in launchers:
            if proc.poll() is None:
                proc.kill()
        for w in workers:
            if w.is_running():
                w.kill()
