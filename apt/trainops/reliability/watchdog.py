"""The hang watchdog: every rank says where it is, and a phase that never ends ends the job.

The loop and the engines mark their phase (``set_phase``: data, forward, backward, optimizer,
sync, checkpoint, evaluation). A daemon thread per rank publishes a heartbeat (a counter, the
step, micro-batch and phase) to the launcher's c10d TCPStore (MASTER_ADDR:MASTER_PORT, a client
connection of its own) every ``heartbeat_s``. When this rank's phase has lasted longer than
``timeout_s`` (a collective that never returns, a rank stalled inside a step) the thread
prints one line naming the rank(s) the others wait for: those whose heartbeat stopped changing
(dead, or frozen without releasing the GIL; the thread reads every heartbeat from half the
timeout on, to tell), else those furthest behind in (step, micro-batch, phase); then it dumps the Python stacks of this process's
threads (faulthandler) and exits with EXIT_HUNG so that torchrun --max-restarts or the SLURM
script restarts the job, which auto-resumes from its last committed checkpoint. Every rank
blocked by the hang does the same, so no rank waits forever.
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import os
import sys
import threading
import time

from . import faults

from apt.core.exit_codes import EXIT_HUNG
# The order of the phases inside one step: a rank in an earlier phase is behind.
PHASES = ("startup", "data", "forward", "backward", "optimizer", "sync", "checkpoint",
          "evaluation", "finish")


class _Position:
    step = 0
    batch = 0      # the global batch drawn from the data (1-based; differs from step after a rewind)
    micro = 0
    phase = "startup"
    since = time.monotonic()


POSITION = _Position()


def set_phase(phase: str, step: int | None = None, batch: int | None = None) -> None:
    """Mark the phase this rank enters (cheap: a few assignments). ``step``: the step being
    trained (given at its start, which also resets the micro-batch count); ``batch``: the
    global batch it trains on."""
    if step is not None:
        POSITION.step, POSITION.micro = step, 0
    if batch is not None:
        POSITION.batch = batch
    if phase == "forward":
        POSITION.micro += 1
    POSITION.phase, POSITION.since = phase, time.monotonic()
    faults.at_phase(POSITION.step, phase)   # test-only fault injection; a no-op otherwise


def _order(beat: dict) -> tuple:
    return beat["step"], beat["micro"], PHASES.index(beat["phase"])


class Watchdog:
    """Start with ``start()``, stop with ``stop()`` (both on every rank)."""

    def __init__(self, timeout_s: float, heartbeat_s: float, rank: int, world_size: int,
                 startup_timeout_s: float | None = None):
        self.timeout_s, self.heartbeat_s = timeout_s, min(heartbeat_s, timeout_s / 2)
        self.startup_timeout_s = startup_timeout_s or timeout_s
        self.rank, self.world_size = rank, world_size
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT",
                                 os.environ.get("SLURM_RESTART_COUNT", "0"))
        # Heartbeats of an earlier attempt (torchrun's store outlives its workers) are not ours.
        self._prefix = f"apt/heartbeat/{restart}/"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="apt-watchdog", daemon=True)
        self._store = None
        self._beat = 0
        self._seen: dict[int, tuple[int, float]] = {}   # rank -> (beat, when it last changed)

    def start(self) -> "Watchdog":
        set_phase("startup", step=0)
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _connect(self):
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if self.world_size == 1 or not addr or not port:
            return None
        import torch.distributed as dist
        return dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=max(self.heartbeat_s, 5)))

    def _run(self) -> None:
        try:
            self._store = self._connect()
        except Exception:   # noqa: BLE001 - no store: this rank still watches itself
            self._store = None
        while not self._stop.wait(self.heartbeat_s):
            stuck_s = time.monotonic() - POSITION.since
            self._publish()
            limit = self.startup_timeout_s if POSITION.phase == "startup" else self.timeout_s
            if stuck_s > limit / 2 and self._store is not None:
                self._observe()   # suspicious: start telling live peers from silent ones
            if stuck_s > limit and not self._stop.is_set():
                self._fire(stuck_s, limit)

    def _publish(self) -> None:
        if self._store is None:
            return
        self._beat += 1
        value = json.dumps({"beat": self._beat, "step": POSITION.step, "micro": POSITION.micro,
                            "phase": POSITION.phase,
                            "in_phase_s": round(time.monotonic() - POSITION.since, 1)})
        try:
            self._store.set(f"{self._prefix}{self.rank}", value)
        except Exception:   # noqa: BLE001 - the store's host is gone: the report says so
            self._store = None

    def _peers(self) -> dict[int, dict | None]:
        """rank -> its last heartbeat (None: none readable)."""
        out = {}
        for rank in range(self.world_size):
            key = f"{self._prefix}{rank}"
            try:
                out[rank] = json.loads(self._store.get(key)) if self._store is not None and \
                    self._store.check([key]) else None
            except Exception:   # noqa: BLE001
                out[rank] = None
        return out

    def _observe(self) -> dict[int, dict | None]:
        """Read every heartbeat; remember when each rank's counter last changed."""
        now, peers = time.monotonic(), self._peers()
        for rank, beat in peers.items():
            if beat is not None and beat["beat"] != self._seen.get(rank, (None,))[0]:
                self._seen[rank] = (beat["beat"], now)
        return peers

    def report(self, stuck_s: float, limit: float) -> str:
        """One line: this rank's position and who the job waits for."""
        me = (f"rank {self.rank}: no progress for {stuck_s:.0f} s (timeout {limit:g} s)"
              f" at step {POSITION.step}, phase {POSITION.phase}")
        if self._store is None:
            return f"watchdog | {me}; the other ranks' heartbeats are unreachable"
        now, peers = time.monotonic(), self._observe()
        silent = []
        for rank, beat in peers.items():
            if beat is None:
                silent.append(f"rank {rank} (no heartbeat)")
            elif now - self._seen[rank][1] >= 2 * self.heartbeat_s:
                silent.append(f"rank {rank} (heartbeat silent for "
                              f"{now - self._seen[rank][1]:.0f} s, last at step {beat['step']}, "
                              f"phase {beat['phase']})")
        alive = {r: b for r, b in peers.items() if b is not None}
        if silent:
            culprit = "stopped answering: " + ", ".join(silent)
        elif len({_order(b) for b in alive.values()}) == 1:
            b = next(iter(alive.values()))
            culprit = (f"every rank is in step {b['step']}, phase {b['phase']}: a collective "
                       f"that never returns")
        else:
            behind = min(_order(b) for b in alive.values())
            culprit = "stalled: " + ", ".join(
                f"rank {r} (step {b['step']}, phase {b['phase']}, {b['in_phase_s']:.0f} s in it)"
                for r, b in sorted(alive.items()) if _order(b) == behind)
        return f"watchdog | {me}; {culprit}"

    def _fire(self, stuck_s: float, limit: float) -> None:
        print(self.report(stuck_s, limit), file=sys.stderr, flush=True)
        print(f"watchdog | rank {self.rank}: Python stacks of this process:", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(f"watchdog | rank {self.rank}: exiting with code {EXIT_HUNG} (the launcher may "
              f"restart the job; auto-resume continues from the last committed checkpoint)",
              file=sys.stderr, flush=True)
        # The other ranks' watchdogs fire within about a heartbeat of this one: give them the
        # time to report before the launcher, seeing this exit, stops them.
        for _ in range(2):
            time.sleep(self.heartbeat_s)
            self._publish()
        os._exit(EXIT_HUNG)
