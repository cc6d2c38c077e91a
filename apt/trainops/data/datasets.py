"""Pretraining dataset: documents joined with EOD tokens, cut into fixed-length samples."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset


class TokenDataset(Dataset):
    """Sample i covers tokens [i*L, i*L + L + 1): inputs are the first L, labels the last L.

    Samples do not overlap; a document may continue into the next sample, with the EOD token
    marking where one document ends and the next begins (as Megatron's GPTDataset does)."""

    def __init__(self, tokens: np.ndarray, seq_length: int, name: str = "dataset"):
        if tokens.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D token array, got shape {tokens.shape}")
        if len(tokens) < seq_length + 1:
            raise ValueError(f"{name}: {len(tokens)} tokens cannot fill one sample of "
                             f"{seq_length + 1} tokens")
        self.tokens, self.seq_length, self.name = tokens, seq_length, name
        self._position_ids = torch.arange(seq_length, dtype=torch.long)

    @classmethod
    def from_documents(cls, documents, tokenizer, seq_length: int, name: str = "dataset"):
        pieces = []
        for _, text in documents:
            pieces.append(tokenizer.encode(text))
            pieces.append(np.array([tokenizer.eod_id]))
        tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
        return cls(tokens, seq_length, name)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_length

    def __getitem__(self, index: int) -> dict:
        start = index * self.seq_length
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_length + 1].astype(np.int64))
        return {"tokens": chunk[:-1], "labels": chunk[1:],
                "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
                "position_ids": self._position_ids, "sample_id": torch.tensor(index)}

    def unigram_entropy(self) -> float:
        """Entropy in nats of the token unigram distribution: the loss of a model that ignores
        context. A language model must get well below it to have learned anything."""
        counts = np.bincount(self.tokens).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)
