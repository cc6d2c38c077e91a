"""Blending datasets by weight: ``data.blend: [[0.7, path_a], [0.3, path_b]]``.

The blended dataset has as many samples as its parts together. Its j-th sample comes from the
dataset whose turn it is: dataset d's k-th sample is due at time (k + 0.5) / w_d, and samples
are served in order of due time, so every prefix of the blend matches the weights to within one
sample per dataset. A dataset that its weight asks for more often than it has samples wraps
around (it is upsampled); one asked for less is subsampled. The (dataset, sample) index is
built once, cached and memory-mapped (cache.py)."""
from __future__ import annotations

import numpy as np
import torch

from ..sources.cache import cache_key, cached_array
from .batches import LMBatch
from .tokens import BatchIndexed
from ..errors import DataError


def normalise_weights(weights, where: str = "data.blend") -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w):
        raise DataError(None, "needs at least one [weight, path] pair", key=where)
    for i, value in enumerate(w):
        if not np.isfinite(value) or value < 0:
            raise DataError(None, f"weight {weights[i]} of entry {i} is negative or not "
                                  f"finite", key=where)
    if w.sum() <= 0:
        raise DataError(None, "weights sum to zero", key=where)
    return w / w.sum()


def blend_index(weights: np.ndarray, sizes: list[int], total: int) -> np.ndarray:
    """[total, 2] int64: (dataset, sample within it) of each blended sample."""
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.floor(weights * total).astype(np.int64)
    counts[np.argsort(-(weights * total - counts), kind="stable")[:total - counts.sum()]] += 1
    due = np.concatenate([(np.arange(c) + 0.5) / w for c, w in zip(counts, weights) if c])
    which = np.concatenate([np.full(c, d) for d, c in enumerate(counts) if c])
    rank = np.concatenate([np.arange(c) for c in counts if c])
    order = np.lexsort((which, due))
    which, rank = which[order], rank[order]
    return np.stack([which, rank % np.asarray(sizes, dtype=np.int64)[which]], axis=1)


class BlendedDataset(BatchIndexed):
    def __init__(self, datasets: list, weights, cache_dir: str | None = None, name: str = "blend"):
        self.datasets, self.name = list(datasets), name
        self.weights = normalise_weights(weights)
        if len(self.weights) != len(self.datasets):
            raise ValueError(f"{len(self.weights)} weights for {len(self.datasets)} datasets")
        sizes = [len(d) for d in self.datasets]
        self.seq_length = self.datasets[0].seq_length
        total = sum(sizes)

        def build():
            return blend_index(self.weights, sizes, total)
        if cache_dir:
            key = cache_key("blend", self.weights.tolist(), sizes,
                            [getattr(d, "fingerprint", d.name) for d in self.datasets])
            self.index = cached_array(cache_dir, f"{name}-{key}", build)
        else:
            self.index = build()

    def __len__(self) -> int:
        return len(self.index)

    def get_batch(self, indices) -> LMBatch:
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.asarray(self.index[indices])
        parts, where = [], []
        for d in np.unique(rows[:, 0]):
            mine = np.nonzero(rows[:, 0] == d)[0]
            parts.append(self.datasets[d].get_batch(rows[mine, 1]))
            where.append(mine)
        where = np.concatenate(where)
        inverse = torch.from_numpy(np.argsort(where))
        # index_select: plain tensor[index] is orders of magnitude slower on CPU here
        batch = LMBatch.concat(parts)._map(lambda v: v.index_select(0, inverse))
        batch.sample_id = torch.from_numpy(indices)
        batch.dataset_id = torch.from_numpy(rows[:, 0].copy())
        return batch

    def unigram_entropy(self) -> float:
        return float(sum(w * d.unigram_entropy() for w, d in zip(self.weights, self.datasets)))
