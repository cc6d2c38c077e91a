"""A global, resumable batch order sharded over data-parallel ranks.

Global batch k of epoch e is a fixed slice of a permutation keyed by (seed, e). Each
data-parallel rank takes its contiguous share of every global batch and splits it into
micro-batches. So the global order does not depend on the data-parallel size, and resuming at
``consumed_samples`` jumps straight there: no batches are replayed.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler):
    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 consumed_samples: int = 0, infinite: bool = True):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch "
                             f"{micro_batch} x data-parallel size {dp_size}")
        self.batches_per_epoch = num_samples // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {num_samples} samples cannot fill one global batch "
                             f"of {global_batch}")
        if consumed_samples % global_batch:
            raise ValueError(f"consumed_samples {consumed_samples} is not a whole number of "
                             f"global batches of {global_batch}")
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.consumed_samples, self.infinite = consumed_samples, infinite
        self._order_cache: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_cache and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        self._order_cache = (epoch, order)
        return order

    def global_batch_indices(self, batch_number: int) -> np.ndarray:
        """Sample indices of global batch ``batch_number`` (counted over all epochs)."""
        epoch, k = divmod(batch_number, self.batches_per_epoch)
        return self.epoch_order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]

    def __iter__(self):
        batch_number = self.consumed_samples // self.global_batch
        share = self.global_batch // self.dp_size
        while self.infinite or batch_number < self.batches_per_epoch:
            indices = self.global_batch_indices(batch_number)
            mine = indices[self.dp_rank * share:(self.dp_rank + 1) * share]
            for start in range(0, share, self.micro_batch):
                yield mine[start:start + self.micro_batch].tolist()
            batch_number += 1

    def __len__(self) -> int:
        return self.batches_per_epoch * self.global_batch // (self.dp_size * self.micro_batch)
