"""A global, resumable batch order sharded over data-parallel ranks.

Global batch k of epoch e is a fixed slice of a permutation keyed by (seed, e). Each
data-parallel rank takes its contiguous share of every global batch and splits it into
micro-batches. So the global order does not depend on the data-parallel size, and resuming at
``consumed_samples`` jumps straight there: no batches are replayed.

Two permutations: ``full`` draws a NumPy permutation of the epoch (O(samples) time and memory
once per epoch: fine up to a few million samples); ``feistel`` is a keyed bijection of
[0, samples) evaluated only at the positions asked for (a 4-round Feistel network on the next
even power of two, cycle-walked back into range), so its cost is per batch, never per epoch,
and resuming at sample 10 billion costs what resuming at sample 10 does. ``auto`` picks
``full`` up to ``FULL_PERMUTATION_LIMIT`` samples.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

FULL_PERMUTATION_LIMIT = 1 << 22
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class FeistelPermutation:
    """A pseudo-random bijection of [0, n) keyed by (seed, epoch), evaluated lazily."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        rng = np.random.default_rng([seed, epoch, 0xFE157E1])
        self.keys = rng.integers(0, 1 << 63, size=self.ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        x = (right ^ key) * np.uint64(0x9E3779B97F4A7C15)  # splitmix64 finaliser, wraps mod 2^64
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        return x & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << shift) | right

    def __getitem__(self, positions) -> np.ndarray:
        x = self._encrypt(np.asarray(positions, dtype=np.uint64))
        out = x >= self.n
        while out.any():  # cycle-walk: a bijection of the domain restricted to [0, n)
            x[out] = self._encrypt(x[out])
            out = x >= self.n
        return x.astype(np.int64)


class GlobalBatchSampler(Sampler):
    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 consumed_samples: int = 0, infinite: bool = True, permutation: str = "auto"):
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
        if permutation not in ("auto", "full", "feistel"):
            raise ValueError(f"permutation must be auto, full or feistel, got {permutation!r}")
        if permutation == "auto":
            permutation = "full" if num_samples <= FULL_PERMUTATION_LIMIT else "feistel"
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.consumed_samples, self.infinite = consumed_samples, infinite
        self.permutation = permutation
        self._order_cache: tuple[int, object] | None = None

    def epoch_order(self, epoch: int):
        """The epoch's order: an array, or a lazily evaluated ``FeistelPermutation``."""
        if self._order_cache and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if not self.shuffle:
            order = np.arange(self.num_samples)
        elif self.permutation == "full":
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = FeistelPermutation(self.num_samples, self.seed, epoch)
        self._order_cache = (epoch, order)
        return order

    def global_batch_indices(self, batch_number: int) -> np.ndarray:
        """Sample indices of global batch ``batch_number`` (counted over all epochs)."""
        epoch, k = divmod(batch_number, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        start = k * self.global_batch
        if isinstance(order, FeistelPermutation):
            return order[np.arange(start, start + self.global_batch)]
        return order[start:start + self.global_batch]

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
