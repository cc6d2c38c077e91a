"""Writing a checkpoint's shards in the background while training goes on.

Megatron's ``dist_checkpointing.save(..., async_sharded_save=True)`` does the collective part
(planning which rank writes which shard) and returns an ``AsyncRequest``: a write function over
this rank's "write buckets" plus finalize functions that must run on every rank once every
rank's writes are done. Here:

- ``stage_in_host_memory`` copies every tensor a request will write into fresh host memory.
  This is the only part the training loop waits for. Megatron's own staging
  (``tensor.to("cpu")``) copies nothing for CPU tensors, which the next optimizer step changes in
  place, and ZeRO-3's gathered parameters are freed as soon as the save call returns.
- ``ShardWriter`` runs the write functions of every part of one checkpoint in one forked process
  (or inline for a synchronous save), then fsyncs and checksums the files it wrote and leaves
  their manifest entries in ``<checkpoint>/.parts/rank-N.json``. Rank 0 then commits without
  rereading the shards.
- The forked writer, and the helper processes Megatron forks from it, die with the trainer
  (``PR_SET_PDEATHSIG``). An orphaned writer would go on writing into a directory that the
  restarted run is about to clean up.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from . import results_queue
from .manifest import file_entry, fsync

PARTS = ".parts"   # per-rank manifest entries, merged into manifest.json and removed at commit
# The background writer yields the CPU to the trainer (its data workers, the host side of the
# step): a slower write only delays the commit; a slower step delays everything.
WRITER_NICENESS = 10


def start_writer_warmup() -> threading.Thread:
    """Start, in a thread, what the first save would otherwise wait for: the queue Megatron's
    writers report to, served by another process (results_queue.py)."""
    thread = threading.Thread(target=results_queue.install, name="apt-checkpoint-warmup",
                              daemon=True)
    thread.start()
    return thread


def stage_in_host_memory(request, private: bool = False):
    """The request with every tensor it writes in host memory of its own (the copy is the
    snapshot: training may change the originals as soon as this returns). ``private``: the
    tensors were made for this save (e.g. gathered optimizer state), so host tensors are kept
    as they are and only device tensors are copied."""
    if request is None or request.async_fn is None:
        return request
    rank, buckets, results_queue = request.async_fn_args
    staged = [(file, key, (byte_items, [(item, _host_copy(t, private))
                                        for item, t in tensor_items]))
              for file, key, (byte_items, tensor_items) in buckets]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return request._replace(async_fn_args=(rank, staged, results_queue), preload_fn=None)


def _host_copy(tensor: torch.Tensor, private: bool) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.to("cpu", non_blocking=True)
    return tensor if private else tensor.clone()


class ShardWriter:
    """One rank's writes for one checkpoint: started once, joined once."""

    def __init__(self, requests: list, root: Path, rank: int):
        self.requests = [r for r in requests if r is not None and r.async_fn is not None]
        self.root, self.rank = root, rank
        self.process = None
        self.error: str | None = None

    def start(self, background: bool) -> None:
        if not background:
            try:
                _write(self.requests, self.root, self.rank)
            except Exception as exc:   # reported by join() on every rank, like a writer's crash
                self.error = f"{type(exc).__name__}: {exc}"
            return
        # fork: the writer shares the staged copies without pickling them (Megatron's
        # TemporalAsyncCaller does the same); not a daemon, since it forks helpers itself.
        self.process = mp.get_context("fork").Process(
            target=_write, args=(self.requests, self.root, self.rank, os.getpid()),
            name=f"apt-checkpoint-writer-{self.rank}")
        self.process.start()

    def running(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def join(self) -> str | None:
        """Wait for the writer; None if it succeeded, else what went wrong."""
        if self.process is not None:
            self.process.join()
            if self.process.exitcode != 0:
                self.error = f"the checkpoint writer exited with code {self.process.exitcode}"
            self.process = None
        return self.error

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process = None


def _write(requests: list, root: Path, rank: int, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
        os.nice(WRITER_NICENESS)
    start, written = time.perf_counter(), []
    for request in requests:
        request.async_fn(*request.async_fn_args, **request.async_fn_kwargs)
        written += [Path(file) for file, _, _ in request.async_fn_args[1]]
    entries = {str(path.relative_to(root)): file_entry(path) for path in written
               if path.is_file()}   # a failed write shows up in Megatron's finalize instead
    parts = root / PARTS
    parts.mkdir(exist_ok=True)
    part = parts / f"rank-{rank:05d}.json"
    tmp = part.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": entries, "write_s": time.perf_counter() - start}))
    fsync(tmp)
    os.replace(tmp, part)


def read_parts(root: Path) -> tuple[dict, float]:
    """Every rank's manifest entries and the slowest rank's write time."""
    files, slowest = {}, 0.0
    for part in sorted((root / PARTS).glob("rank-*.json")):
        data = json.loads(part.read_text())
        files.update(data["files"])
        slowest = max(slowest, data["write_s"])
    return files, slowest


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process, and every process it forks, when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    arm()
    os.register_at_fork(after_in_child=arm)   # Megatron's write helpers, forked from here
    if os.getppid() != parent_pid:            # the parent died before the line above
        os._exit(1)
