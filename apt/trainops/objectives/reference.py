"""The frozen reference policy of preference losses, without a second model graph.

DPO compares the policy's log-probabilities of an answer with a frozen reference's, usually the
initial (SFT) weights. A second model would double the device memory and need its own sharding.
Instead ``FrozenReference`` keeps a host-memory copy of this rank's shard of the initial weights
(TP/PP shards as this rank holds them, ZeRO-3 partitions once DeepSpeed has partitioned) and
swaps it into the same model for a forward-only pass: policy weights go to a host buffer, the
reference's are copied in, the pass runs, the policy's are copied back. Copies are in place, so
every view that engines hold on the parameters (Megatron's contiguous buffers, DeepSpeed's
partitions) stays valid, and the pass runs through the layout's own schedule, so it works on
every layout the training does.

Two ways to use it (``training.dpo.reference``):
- ``live``: before every step, one swap and one forward-only pass over the step's micro-batches;
- ``precomputed``: the same pass once over the whole dataset before training; the log-probs are
  stored next to the data (a cache keyed by the data's and the reference's fingerprints) and
  the weights are dropped, so nothing is held while training.
Both give the same numbers: the pass and the model are the same.

The initial weights are rebuilt exactly on resume (``training.init_from`` is loaded again, the
seeded init is deterministic), and ``digest`` lets a resumed run check that they were.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("apt.objectives")


def _zero3_partition(param) -> tuple[torch.Tensor, int] | None:
    """(this rank's flat partition, its offset in the flattened parameter) under ZeRO-3."""
    if not hasattr(param, "ds_tensor"):
        return None
    part = param.ds_tensor
    rank = dist.get_rank(group=param.ds_process_group)
    return part, rank * part.ds_numel


class FrozenReference:
    """A host copy of the weights ``modules`` hold now, to swap in for reference passes."""

    def __init__(self, modules):
        self.modules = list(modules)
        self.params = [p for m in self.modules for p in m.parameters()]
        pin = torch.cuda.is_available()
        self.weights = [p.detach().to("cpu", copy=True) for p in self.params]
        if pin:
            self.weights = [w.pin_memory() for w in self.weights]
        self._stash: list[torch.Tensor] | None = None
        self.digest = _digest(self.weights)

    @property
    def nbytes(self) -> int:
        held = self.weights + (self._stash or [])
        return sum(t.numel() * t.element_size() for t in held)

    def _targets(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per parameter: (device tensor the forward reads, matching slice of the reference).
        Under ZeRO-3 the partition (and the full tensor of persistent small parameters)."""
        out = []
        for i, (param, saved) in enumerate(zip(self.params, self.weights)):
            partition = _zero3_partition(param)
            if partition is None:
                out.append([(param.data, saved)])
                continue
            part, start = partition
            flat = saved.flatten()
            count = max(0, min(part.numel(), flat.numel() - start))
            pairs = [(part.data[:count], flat[start:start + count])]
            if param.data.numel() == flat.numel():
                # gathered right now (persistent small parameters always are): the forward
                # may read this full copy without gathering again, so it is swapped too
                pairs.append((param.data, saved))
            out.append(pairs)
        return out

    @contextlib.contextmanager
    def swapped_in(self):
        """The reference's weights in the model inside the block, the policy's after it."""
        targets = [pair for pairs in self._targets() for pair in pairs]
        shapes = [t.shape for t, _ in targets]
        if self._stash is None or [s.shape for s in self._stash] != shapes:
            # one host buffer, reused by every pass (rebuilt when ZeRO-3 gathered other
            # parameters this time)
            self._stash = [torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                       pin_memory=torch.cuda.is_available())
                           for t, _ in targets]
        with torch.no_grad():
            for (live, saved), stash in zip(targets, self._stash):
                stash.copy_(live, non_blocking=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()   # the stash is complete before it is overwritten
            for live, saved in targets:
                live.copy_(saved, non_blocking=True)
        modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()   # the reference is deterministic: no dropout
        try:
            yield
        finally:
            for m, mode in zip(self.modules, modes):
                m.train(mode)
            with torch.no_grad():
                for (live, _), stash in zip(targets, self._stash):
                    live.copy_(stash, non_blocking=True)

    def release(self) -> None:
        self.weights, self._stash = [], None


def _digest(tensors) -> str:
    """This rank's reference bytes, all ranks' digests hashed together (collective): equal
    for equal weights on the same layout."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    mine = h.hexdigest()
    if not dist.is_initialized():
        return mine
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return hashlib.sha256("".join(every).encode()).hexdigest()


def precompute(dataset, micro_batch: int, run_forward, step_fn, reference: FrozenReference,
               cache_dir: str | Path, layout_key: str, coerce, device) -> np.ndarray:
    """[len(dataset), 2] reference log-probs of every pair, computed once (each data-parallel
    rank takes every dp-th micro-batch, the results are summed over ranks) and cached under
    the data's and the reference's fingerprints. Collective."""
    from megatron.core import parallel_state as ps
    key = hashlib.sha256(f"{dataset.fingerprint()}|{reference.digest}|{layout_key}".encode())
    path = Path(cache_dir) / f"reference-logps-{key.hexdigest()[:24]}.npy"
    found = torch.tensor([1.0 if path.is_file() else 0.0])
    dist.all_reduce(found, op=dist.ReduceOp.MIN)   # every rank reads, or every rank computes
    if found.item():
        return np.load(path)
    n = len(dataset)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    every = list(range(0, n, micro_batch))
    starts = every[dp_rank::dp_size]
    # ZeRO-3 gathers weights over data-parallel ranks in every forward: each rank runs the
    # same number of passes (extra ones repeat a micro-batch and are discarded).
    per_rank = -(-len(every) // dp_size)
    batches, rows = [], []
    for start in starts + [0] * (per_rank - len(starts)):
        # A short last micro-batch repeats its last pair: the pipeline needs one shape.
        indices = [min(i, n - 1) for i in range(start, start + micro_batch)]
        batches.append(coerce(dataset.get_batch(indices)).to(device))
        rows.append(list(range(start, min(start + micro_batch, n))) if len(rows) < len(starts)
                    else [])
    values = torch.zeros(n, 2, dtype=torch.float64, device=device)
    with reference.swapped_in():
        outputs = run_forward(batches, step_fn)
    for out, index in zip(outputs, rows):   # the last pipeline stage only
        values[index] = out["logps"][:len(index)].to(torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    if dp_size > 1:
        dist.all_reduce(values, group=ps.get_data_parallel_group())
    result = values.cpu().numpy()
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp.npy")
        np.save(temporary, result)
        temporary.replace(path)
        log.info("reference log-probs of %d pairs precomputed -> %s", n, path)
    dist.barrier()
    return result
