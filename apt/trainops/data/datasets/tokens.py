"""Pretraining dataset: documents joined with EOD tokens, cut into fixed-length samples."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .batches import LMBatch

_ENTROPY_TOKENS = 1 << 26  # unigram entropy reads at most this many tokens of a huge corpus


class BatchIndexed(Dataset):
    """``dataset[i]`` and the DataLoader's ``__getitems__`` both go through ``get_batch``: one
    vectorised read per batch instead of one per sample."""

    def __getitem__(self, index: int) -> LMBatch:
        return self.get_batch([index]).index(0)

    def __getitems__(self, indices) -> LMBatch:
        return self.get_batch(indices)

    def get_batch(self, indices) -> LMBatch:
        raise NotImplementedError


class TokenDataset(BatchIndexed):
    """Sample i covers tokens [i*L, i*L + L + 1): inputs are the first L, labels the last L.

    Samples do not overlap; a document may continue into the next sample, with the EOD token
    marking where one document ends and the next begins (as Megatron's GPTDataset does).
    ``tokens`` may be a memory-mapped ``.bin`` (see indexed.py): nothing is copied.

    With ``eod_id`` set, ``reset_position_ids`` restarts position ids after every EOD and
    ``reset_attention_mask`` adds ``attention_mask`` [1, L, L] per sample (True = masked,
    Megatron's convention) so a token attends only within its own document. ``transforms`` (augment.py)
    are applied to each batch. ``get_batch`` gathers a whole micro-batch with one vectorised
    read; ``__getitems__`` lets ``torch.utils.data.DataLoader`` use it."""

    def __init__(self, tokens: np.ndarray, seq_length: int, name: str = "dataset", *,
                 eod_id: int | None = None, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, transforms=()):
        if tokens.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D token array, got shape {tokens.shape}")
        if len(tokens) < seq_length + 1:
            from ..errors import DataError
            raise DataError(name, f"{len(tokens)} tokens cannot fill one sample of "
                                  f"{seq_length + 1} tokens (data.seq_length={seq_length} + 1)")
        if (reset_position_ids or reset_attention_mask) and eod_id is None:
            raise ValueError(f"{name}: resetting at document boundaries needs eod_id")
        self.tokens, self.seq_length, self.name = tokens, seq_length, name
        self.eod_id = eod_id
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        self.transforms = list(transforms)
        self._window = np.arange(seq_length + 1, dtype=np.int64)

    @classmethod
    def from_documents(cls, documents, tokenizer, seq_length: int, name: str = "dataset",
                       **options):
        pieces = []
        for _, text in documents:
            pieces.append(tokenizer.encode(text))
            pieces.append(np.array([tokenizer.eod_id]))
        tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
        return cls(tokens, seq_length, name, **options)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_length

    def get_batch(self, indices) -> LMBatch:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.name}: sample index out of range [0, {len(self)})")
        if len(indices) == 1:  # a contiguous slice: no gather
            start = int(indices[0]) * self.seq_length
            chunk = np.asarray(self.tokens[start:start + self.seq_length + 1])[None]
        else:
            chunk = self.tokens[(indices * self.seq_length)[:, None] + self._window]
        chunk = torch.from_numpy(chunk.astype(np.int64))
        # No position_ids / attention_mask unless asked for: None means 0..L-1 and causal.
        batch = {"tokens": chunk[:, :-1], "labels": chunk[:, 1:],
                 "loss_mask": torch.ones(len(indices), self.seq_length, dtype=torch.float32),
                 "sample_id": torch.from_numpy(indices)}
        for transform in self.transforms:  # before the layout: a shuffle moves the EODs
            batch = transform(batch)
        if self.reset_position_ids or self.reset_attention_mask:
            batch.update(document_layout(batch["tokens"], self.eod_id, self.reset_position_ids,
                                         self.reset_attention_mask))
        return LMBatch.from_dict(batch)

    def unigram_entropy(self) -> float:
        """Entropy in nats of the token unigram distribution: the loss of a model that ignores
        context. A language model must get well below it to have learned anything."""
        counts = np.bincount(np.asarray(self.tokens[:_ENTROPY_TOKENS])).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def document_layout(tokens: torch.Tensor, eod_id: int, reset_position_ids: bool,
                    reset_attention_mask: bool) -> dict:
    """Position ids restarting after each EOD, and/or a [B, 1, L, L] mask (True = masked)
    confining attention to the token's own document (causal inside it)."""
    batch, length = tokens.shape
    after_eod = torch.zeros_like(tokens, dtype=torch.bool)
    after_eod[:, 1:] = tokens[:, :-1] == eod_id
    out = {}
    if reset_position_ids:
        arange = torch.arange(length).expand(batch, -1)
        starts = torch.where(after_eod, arange, torch.zeros_like(arange))
        out["position_ids"] = arange - torch.cummax(starts, dim=1).values
    if reset_attention_mask:
        out["attention_mask"] = block_causal_mask(torch.cumsum(after_eod.long(), dim=1))
    return out


def block_causal_mask(segment: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True = masked: token t attends to tokens u <= t of its own segment
    (``segment`` [b, s]: a document or record id per token)."""
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    same = segment[:, :, None] == segment[:, None, :]
    return ~(same & causal)[:, None]


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)
