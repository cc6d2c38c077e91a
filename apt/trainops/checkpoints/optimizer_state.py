"""Optimizer state in model space, written with ``dist_checkpointing`` so it reshards.

For every parameter: its fp32 master copy and Adam moments, as tensors of the parameter's own
(TP-local) shape, stored under the parameter's global key with the parameter's sharding, so a
checkpoint loads on another TP / PP / DP layout, another ZeRO stage, and across the DeepSpeed
and Megatron engines (``engine.load_full_optimizer_state`` keeps each rank's fragment).

Saving never gathers the state on one rank: each parameter gets one owner in its data-parallel
group (balanced by size), the group reduces the fragments (``engine.optimizer_state_fragment``)
onto the owner only, and the owner alone writes it. A rank holds about 1/DP of the state.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from apt.trainops.runtime.process_groups import collective_device
from .model_weights import _sharded_state, zero3_gathered
from .checked_reader import checked_dist_dir, checked_load, part_files

STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")
# What a rank materializes at once when loading (the full TP-local state of a few parameters):
# training.checkpoints.load_batch_mib.
LOAD_BATCH_BYTES = 1 << 30


@contextlib.contextmanager
def optimizer_sharded_state(engine):
    """Collective: the optimizer state as a sharded state dict, valid inside the block (ZeRO-3
    parameters are gathered only there); ``CheckpointWrite.add_sharded`` copies it out."""
    with zero3_gathered(engine.modules, engine.plan.zero3_partitioned):
        yield _sharded(engine)


@torch.no_grad()   # masters may be views of the parameters themselves
def load_optimizer_state(engine, directory: Path, batch_bytes: int = LOAD_BATCH_BYTES,
                         verified: bool = False, manifest: dict | None = None) -> None:
    """Collective. Each rank reads the full (TP-local) state of its parameters a batch of at
    most ``batch_bytes`` at a time and keeps its own fragment of it, so host memory at resume
    stays bounded whatever the model size. ``verified``: the checkpoint was verified as a whole
    already; either way the directory is checked once here (against ``manifest``, the verified
    one, or the one next to it) and every batch reads only what that check read."""
    del verified   # the check below is the one that counts: what it reads is what is loaded
    files = part_files(Path(directory).resolve(), manifest) if manifest is not None else None
    with checked_dist_dir(directory, files) as checked, \
            zero3_gathered(engine.modules, engine.plan.zero3_partitioned):
        engine.prepare_optimizer_state()
        batches = _batches(list(_param_shards(engine).items()), batch_bytes)
        # Every rank takes part in every load (they are collective): as many rounds as the
        # rank with the most batches (pipeline stages hold different parameters).
        rounds = torch.tensor([len(batches)], device=collective_device())
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        for i in range(int(rounds.item())):
            batch = batches[i] if i < len(batches) else []
            # A batch reads some layers of a layer-stacked tensor on purpose: Megatron's check
            # that a load covers every shard does not apply (every parameter is read below).
            state = checked_load(checked, _to_load(batch), validate_access_integrity=False)
            for name, (param, _) in batch:
                engine.load_full_optimizer_state(
                    param, {kind: state[f"{kind}.{name}"] for kind in STATE_KINDS})
        engine.set_optimizer_step(state["step"])   # from the common part, in every load


def _to_load(batch: list) -> dict:
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
    return {f"{kind}.{name}": make_sharded_optimizer_tensor(
                sharded, torch.empty(param.shape, dtype=torch.float32), f"optimizer.{kind}")
            for name, (param, sharded) in batch for kind in STATE_KINDS}


def _batches(shards: list, batch_bytes: int) -> list[list]:
    """Consecutive parameters, at most ``batch_bytes`` of state per batch (a larger parameter
    is a batch of its own)."""
    batches, size = [], 0
    for name, (param, sharded) in shards:
        nbytes = len(STATE_KINDS) * 4 * param.numel()
        if not batches or size + nbytes > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append((name, (param, sharded)))
        size += nbytes
    return batches


def _sharded(engine) -> dict:
    """The state to save: assembled on each parameter's owner (_assemble_on_owner)."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
    engine.prepare_optimizer_state()
    out = {"step": engine.optimizer_step_count()}
    owners = _Owners()
    for name, (param, sharded) in _param_shards(engine).items():
        state, mine = _assemble_on_owner(engine, param, owners)
        for kind in STATE_KINDS:
            # Same sharding as the parameter (a factory for SwiGLU's fused gate/up weight).
            entry = make_sharded_optimizer_tensor(sharded, state[kind], f"optimizer.{kind}")
            out[f"{kind}.{name}"] = _owned_by(entry, mine)
    return out


class _Owners:
    """Deterministic owner per parameter within its group: the least loaded rank so far."""

    def __init__(self):
        self.load = {}

    def pick(self, group, numel: int) -> int:
        load = self.load.setdefault(group, [0] * dist.get_world_size(group))
        owner = min(range(len(load)), key=lambda r: (load[r], r))
        load[owner] += numel
        return owner


def _assemble_on_owner(engine, param, owners: _Owners) -> tuple[dict, bool]:
    """(state, whether this rank owns it). Non-owners get shape-only meta tensors: they are
    not the main replica, so dist_checkpointing never reads them."""
    group, start, fragment = engine.optimizer_state_fragment(param)
    shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
    numel = int(torch.Size(shape).numel())
    owner = owners.pick(group, numel)
    mine = dist.get_rank(group) == owner
    if start is None:        # replicated on the group: the owner copies, nobody communicates
        state = {k: fragment[k].detach().float().reshape(shape).clone() for k in STATE_KINDS} \
            if mine else None
    else:
        device = next(iter(fragment.values())).device if fragment else param.device
        buffer = torch.zeros(len(STATE_KINDS), numel, dtype=torch.float32, device=device)
        if fragment:
            for i, kind in enumerate(STATE_KINDS):
                part = fragment[kind].detach().flatten()
                buffer[i, start:start + part.numel()] = part
        dist.reduce(buffer, dst=dist.get_global_rank(group, owner), group=group)
        state = {k: buffer[i].view(shape) for i, k in enumerate(STATE_KINDS)} if mine else None
    if state is None:
        state = {k: torch.empty(shape, dtype=torch.float32, device="meta") for k in STATE_KINDS}
    return state, mine


def _owned_by(entry, mine: bool):
    """The entry with its data-parallel replica id (the last component) saying whether this
    rank's copy is the one written: 0 on the owner, 1 elsewhere."""
    replica = entry.replica_id if isinstance(entry.replica_id, tuple) else (entry.replica_id,)
    return replace(entry, replica_id=(*replica[:-1], 0 if mine else 1))


def _param_shards(engine) -> dict:
    """name -> (parameter, its entry in the model's sharded state dict), in module order (the
    same on every data-parallel rank: engines run collectives in this order)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    by_id = {id(sh.data): sh for sh in nested_values(_sharded_state(engine.modules))
             if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
    shards = {}
    for i, module in enumerate(engine.modules):
        for name, param in module.named_parameters():
            if not param.requires_grad:   # frozen (LoRA's base): no optimizer state
                continue
            if id(param) not in by_id:
                raise RuntimeError(f"{name} has no entry in the model's sharded state dict: its "
                                   f"optimizer state would be left out of the checkpoint")
            shards[f"chunk{i}.{name}"] = (param, by_id[id(param)])
    return shards
