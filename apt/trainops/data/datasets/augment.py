"""Opt-in text augmentations, applied to a batch (``data.augment: [doc_shuffle, span_corruption]``).

Each is deterministic in (seed, sample id): the same sample is augmented the same way on every
rank, every data-parallel size and after every resume."""
from __future__ import annotations

import numpy as np
import torch


def _rng(seed: int, sample_id: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(sample_id), salt])


class DocumentShuffle:
    """Shuffle the order of the documents (EOD-terminated pieces) inside each sample, so the
    model cannot lean on which document tends to follow which."""

    def __init__(self, eod_id: int, seed: int = 0):
        self.eod_id, self.seed = eod_id, seed

    def __call__(self, batch: dict) -> dict:
        chunk = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1).numpy().copy()
        for row, sample_id in zip(chunk, batch["sample_id"].tolist()):
            ends = np.nonzero(row == self.eod_id)[0] + 1
            pieces = np.split(row, ends[ends < len(row)])
            if len(pieces) > 1:
                order = _rng(self.seed, sample_id, 1).permutation(len(pieces))
                row[:] = np.concatenate([pieces[i] for i in order])
        chunk = torch.from_numpy(chunk)
        return {**batch, "tokens": chunk[:, :-1], "labels": chunk[:, 1:]}


class SpanCorruption:
    """Replace random spans of the *inputs* with ``mask_id`` (labels keep the true next tokens):
    about ``rate`` of the input positions, in spans of mean length ``mean_span``."""

    def __init__(self, mask_id: int, rate: float = 0.15, mean_span: float = 3.0, seed: int = 0):
        if not 0 < rate < 1 or mean_span < 1:
            raise ValueError("span corruption needs 0 < rate < 1 and mean_span >= 1")
        self.mask_id, self.rate, self.mean_span, self.seed = mask_id, rate, mean_span, seed

    def __call__(self, batch: dict) -> dict:
        tokens = batch["tokens"].clone()
        length = tokens.shape[1]
        for row, sample_id in zip(tokens, batch["sample_id"].tolist()):
            rng = _rng(self.seed, sample_id, 2)
            spans = max(1, round(length * self.rate / self.mean_span))
            starts = rng.integers(0, length, spans)
            lengths = rng.geometric(1 / self.mean_span, spans)
            for s, n in zip(starts, lengths):
                row[s:s + n] = self.mask_id
        return {**batch, "tokens": tokens}


def build_transforms(names, tokenizer, seed: int, span_rate: float = 0.15) -> list:
    transforms = []
    for name in names or ():
        if name == "doc_shuffle":
            transforms.append(DocumentShuffle(tokenizer.eod_id, seed))
        elif name == "span_corruption":
            transforms.append(SpanCorruption(tokenizer.pad_id, span_rate, seed=seed))
        else:
            raise ValueError(f"unknown augmentation {name!r}")
    return transforms
