"""Optimizer state in model space, written with ``dist_checkpointing`` so it reshards.

For every parameter: its fp32 master copy and Adam moments, as tensors of the parameter's own
(TP-local) shape, stored under the parameter's global key with the parameter's sharding. Each
engine assembles them from its data-parallel shards (``engine.full_optimizer_state``) and
scatters them back (``engine.load_full_optimizer_state``), so a checkpoint loads on another
TP / PP / DP layout, another ZeRO stage, and across the DeepSpeed and Megatron engines.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .model_weights import _sharded_state, zero3_gathered

STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")


@contextlib.contextmanager
def optimizer_sharded_state(engine):
    """Collective: the optimizer state as a sharded state dict, valid inside the block (ZeRO-3
    parameters are gathered only there); ``CheckpointWrite.add_sharded`` copies it out."""
    with zero3_gathered(engine.modules, engine.plan.zero3_partitioned):
        yield _sharded(engine, is_loading=False)


@torch.no_grad()   # masters may be views of the parameters themselves
def load_optimizer_state(engine, directory: Path) -> None:
    from megatron.core import dist_checkpointing
    with zero3_gathered(engine.modules, engine.plan.zero3_partitioned):
        state = dist_checkpointing.load(_sharded(engine, is_loading=True), str(directory))
        for name, (param, _) in _param_shards(engine).items():
            engine.load_full_optimizer_state(
                param, {kind: state[f"{kind}.{name}"] for kind in STATE_KINDS})
        engine.set_optimizer_step(state["step"])


def _sharded(engine, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
    engine.prepare_optimizer_state()
    out = {"step": engine.optimizer_step_count()}
    for name, (param, sharded) in _param_shards(engine).items():
        full = None if is_loading else engine.full_optimizer_state(param)
        for kind in STATE_KINDS:
            value = torch.empty(param.shape, dtype=torch.float32) if is_loading else full[kind]
            # Same sharding as the parameter (a factory for SwiGLU's fused gate/up weight).
            out[f"{kind}.{name}"] = make_sharded_optimizer_tensor(sharded, value,
                                                                  f"optimizer.{kind}")
    return out


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
            if id(param) not in by_id:
                raise RuntimeError(f"{name} has no entry in the model's sharded state dict: its "
                                   f"optimizer state would be left out of the checkpoint")
            shards[f"chunk{i}.{name}"] = (param, by_id[id(param)])
    return shards
