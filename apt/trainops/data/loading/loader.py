"""``create_dataloader``: the seed's entry point, over the global resumable sampler."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..datasets.batches import LMBatch, PreferenceBatch
from ..datasets.prompts import PromptBatch
from .sampler import GlobalBatchSampler


class APTDataLoader(DataLoader):
    """A DataLoader whose batch order is a ``GlobalBatchSampler`` (see sampler.py)."""

    @property
    def global_batch(self) -> int:
        return self.batch_sampler.global_batch


def create_dataloader(dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, *,
                      seed: int = 1234, global_batch_size: int | None = None,
                      data_parallel_rank: int | None = None,
                      data_parallel_size: int | None = None, consumed_samples: int = 0,
                      infinite: bool = True, permutation: str = "auto") -> APTDataLoader:
    """``batch_size`` is the per-process micro-batch. The data-parallel rank and size default to
    the running Megatron groups (1 process when none exist); ``global_batch_size`` defaults to
    one micro-batch on every data-parallel rank. Resuming at ``consumed_samples`` (a multiple of
    the global batch) starts exactly where a run that consumed that many samples stopped.
    ``permutation`` is the sampler's epoch order (auto, full, feistel: see sampler.py)."""
    if data_parallel_size is None or data_parallel_rank is None:
        data_parallel_rank, data_parallel_size = _data_parallel_position()
    global_batch = global_batch_size or batch_size * data_parallel_size
    sampler = GlobalBatchSampler(len(dataset), global_batch, batch_size,
                                 dp_rank=data_parallel_rank, dp_size=data_parallel_size,
                                 seed=seed, shuffle=shuffle, consumed_samples=consumed_samples,
                                 infinite=infinite, permutation=permutation)
    return APTDataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                         persistent_workers=num_workers > 0, collate_fn=_stack)


def _data_parallel_position() -> tuple[int, int]:
    from megatron.core import parallel_state
    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size())
    return 0, 1


def _stack(samples):
    """Datasets with ``__getitems__`` hand over a whole batch already (one vectorised read);
    otherwise stack per-sample fields, keeping the samples' type (LMBatch or dict)."""
    if isinstance(samples, (dict, LMBatch, PreferenceBatch, PromptBatch)):
        return samples
    stacked = {key: torch.stack([s[key] for s in samples]) for key in samples[0].keys()}
    return stacked if isinstance(samples[0], dict) else type(samples[0]).from_dict(stacked)
