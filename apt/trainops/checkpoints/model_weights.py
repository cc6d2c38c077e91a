"""Model weights as a Megatron ``dist_checkpointing`` checkpoint: any layout writes it, any
layout reads it (TP/PP/VP/EP resharding happens on load).

Each sharded tensor is stored under its global key (layer numbers are global, TP shards are
slices of the full tensor), so a checkpoint written by TP2 x PP2 loads into one process and
the other way round.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from . import results_queue
from .errors import CheckpointError
from .checked_reader import checked_dist_dir, checked_load, part_files
from .safe_unpickle import checked_on_rank0
from .verification import check_weights_dir

# The model config (the shape the shards need) written next to them by save_model_weights, so
# that the directory alone rebuilds the model (apt.trainops.interop.pretrained reads it).
MODEL_CONFIG_FILE = "apt_model.json"


def _sharded_state(modules: list[torch.nn.Module], trainable_only: bool = False) -> dict:
    """``trainable_only``: just the parameters that train (LoRA adapters over a frozen base,
    which is rebuilt from ``training.init_from`` or the seeded init, not checkpointed)."""
    # Chunk dicts are only containers: storage is keyed by each ShardedTensor's global key.
    state = {f"chunk{i}": _module_sharded_state(m, f"{i}." if len(modules) > 1 else "")
             for i, m in enumerate(modules)}
    if trainable_only:
        state = {chunk: {k: v for k, v in entries.items()
                         if getattr(getattr(v, "data", None), "requires_grad", False)}
                 for chunk, entries in state.items()}
    return state


def _module_sharded_state(module: torch.nn.Module, prefix: str) -> dict:
    if hasattr(module, "sharded_state_dict"):   # Megatron modules: TP/PP-aware global keys
        return module.sharded_state_dict()
    # Any other torch module: its state dict, each tensor whole and replicated over the
    # data-parallel ranks (Megatron's groups, a one-process one outside a launched run).
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
    from apt.trainops.runtime.process_groups import ensure_runtime
    ensure_runtime()
    sharded = make_sharded_tensors_for_checkpoint(module.state_dict(), prefix)
    return {key[len(prefix):]: value for key, value in sharded.items()}   # load_state_dict's


def save_model_weights(modules: list[torch.nn.Module], directory: str | Path,
                       zero3: bool = False) -> Path:
    """Collective: every rank calls it. ``zero3`` gathers DeepSpeed-partitioned params first."""
    from megatron.core import dist_checkpointing
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    results_queue.install()   # not Megatron's spawned one: it re-runs unguarded scripts
    with zero3_gathered(modules, zero3):
        dist_checkpointing.save(_sharded_state(modules), str(directory))
    arch = getattr(modules[0], "arch", None)
    if arch is not None and dist.get_rank() == 0:
        # The shape the shards need, so the directory alone rebuilds the model
        # (APTModel.from_pretrained); Megatron ignores files it does not know.
        (directory / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(arch), indent=1))
    return directory


def load_model_weights(modules: list[torch.nn.Module], directory: str | Path,
                       trainable_only: bool = False, verified: bool = False,
                       manifest: dict | None = None) -> None:
    """Collective. ``verified``: the caller ran the checkpoint's verification already
    (CheckpointManager / check_weights_dir); otherwise it runs here, on rank 0, first.
    Either way the load reads only what its own check read (checked_reader.py), compared with
    ``manifest`` (the verified one; default: the one next to the directory, if any)."""
    if not Path(directory, "metadata.json").is_file():
        raise CheckpointError(f"{directory}: not a dist_checkpointing checkpoint "
                              f"(no metadata.json)")
    if not verified:
        checked_on_rank0(check_weights_dir, directory)   # the checkpoint as a whole
    files = part_files(Path(directory).resolve(), manifest) if manifest is not None else None
    with checked_dist_dir(directory, files) as checked:
        state = checked_load(checked, _sharded_state(modules, trainable_only))
    for i, module in enumerate(modules):
        # Partial (trainable only): every entry asked for was loaded, or load() raised.
        module.load_state_dict(state[f"chunk{i}"], strict=not trainable_only)


@contextlib.contextmanager
def zero3_gathered(modules, zero3: bool):
    """Full parameters inside the block when DeepSpeed ZeRO-3 partitioned them (collective)."""
    if not zero3:
        yield
        return
    import deepspeed
    params = [p for m in modules for p in m.parameters()]
    with deepspeed.zero.GatheredParameters(params):
        yield
