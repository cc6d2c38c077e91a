"""Typed batches: what a dataset returns and an objective consumes.

Every field is declared here. ``LMBatch`` is one micro-batch of next-token data; optional
fields (per-document ``position_ids``, a block-diagonal ``attention_mask``) are None when the
data has no document structure, so a model that cannot honour them can refuse them
(``require_supported``) instead of silently training on something else.
``PreferenceBatch`` holds the two halves of preference pairs, row i of ``chosen`` against row i
of ``rejected``, always in the same micro-batch.

Both read like a mapping too (``batch["tokens"]``), for code written against the loader's
earlier plain dicts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Optional

import torch

Tensor = torch.Tensor


class _Fields:
    """Mapping-style reads, device moves and row selection shared by the batch types."""

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(f"{type(self).__name__} has no field {key!r}; fields: "
                           f"{', '.join(f.name for f in fields(self))}")
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def _map(self, fn):
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.items()})

    def to(self, device, non_blocking: bool = False):
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this on custom batch types
        return self._map(lambda v: v.pin_memory())

    @classmethod
    def from_dict(cls, data: dict):
        """The batch from a plain dict of its fields (an unknown field is refused)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
        return cls(**data)


@dataclass
class LMBatch(_Fields):
    """One micro-batch of next-token prediction data, ``b`` rows of ``s`` tokens.

    ``labels[t]`` is the token after ``tokens[t]``; ``loss_mask`` (float, 0/1) selects the
    labels that are trained and scored. ``position_ids`` [b, s]: None means 0..s-1.
    ``attention_mask`` [b, 1, s, s] bool, True = masked (Megatron's convention): None means
    plain causal attention. ``sample_id`` [b]: global sample indices (resume digests),
    ``dataset_id`` [b]: which part of a blend each row came from."""

    tokens: Tensor
    labels: Tensor
    loss_mask: Tensor
    position_ids: Optional[Tensor] = None
    attention_mask: Optional[Tensor] = None
    sample_id: Optional[Tensor] = None
    dataset_id: Optional[Tensor] = None

    def __post_init__(self):
        if self.tokens.shape != self.labels.shape or self.tokens.shape != self.loss_mask.shape:
            raise ValueError(f"LMBatch: tokens {tuple(self.tokens.shape)}, labels "
                             f"{tuple(self.labels.shape)} and loss_mask "
                             f"{tuple(self.loss_mask.shape)} must have one shape")

    @property
    def rows(self) -> int:
        return self.tokens.shape[0] if self.tokens.dim() > 1 else 1

    @property
    def model_shape(self) -> tuple[int, int]:
        """(rows, sequence length) of the model's input: the pipeline's activation shape."""
        return tuple(self.tokens.shape)

    def index(self, rows) -> "LMBatch":
        return self._map(lambda v: v[rows])

    @classmethod
    def concat(cls, batches: list["LMBatch"]) -> "LMBatch":
        """Rows of several batches in one (a field must be set in all or in none)."""
        out = {}
        for f in fields(cls):
            values = [getattr(b, f.name) for b in batches]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values):
                raise ValueError(f"LMBatch.concat: field {f.name!r} is set in some batches only")
            out[f.name] = torch.cat(values)
        return cls(**out)


@dataclass
class PreferenceBatch(_Fields):
    """Preference pairs: ``chosen`` row i is preferred to ``rejected`` row i (same prompt).

    ``reference_logps`` [b, 2] float64: the reference model's summed log-probabilities of the
    (chosen, rejected) answers, when precomputed with the data or filled in by the live
    reference pass before the step (apt/trainops/objectives/reference.py); None otherwise."""

    chosen: LMBatch
    rejected: LMBatch
    sample_id: Optional[Tensor] = None
    reference_logps: Optional[Tensor] = None

    def __post_init__(self):
        if self.chosen.tokens.shape != self.rejected.tokens.shape:
            raise ValueError("PreferenceBatch: chosen and rejected must have one shape")

    @property
    def rows(self) -> int:
        return self.chosen.rows

    @property
    def model_shape(self) -> tuple[int, int]:
        """Both halves of every pair go through the model together (``stacked``)."""
        rows, length = self.chosen.model_shape
        return 2 * rows, length

    def _map(self, fn):
        return PreferenceBatch(self.chosen._map(fn), self.rejected._map(fn),
                               None if self.sample_id is None else fn(self.sample_id),
                               None if self.reference_logps is None else fn(self.reference_logps))

    def index(self, rows) -> "PreferenceBatch":
        return self._map(lambda v: v[rows])

    @classmethod
    def from_dict(cls, data: dict) -> "PreferenceBatch":
        """From ``chosen_<field>`` / ``rejected_<field>`` keys (the loader's plain dicts)."""
        sides = {side: LMBatch.from_dict({k[len(side) + 1:]: v for k, v in data.items()
                                          if k.startswith(side + "_")})
                 for side in ("chosen", "rejected")}
        rest = {k: v for k, v in data.items() if not k.startswith(("chosen_", "rejected_"))}
        unknown = sorted(set(rest) - {"sample_id", "reference_logps"})
        if unknown:
            raise ValueError(f"PreferenceBatch has no field(s) {', '.join(unknown)}")
        return cls(sides["chosen"], sides["rejected"], **rest)

    def stacked(self) -> LMBatch:
        """Chosen rows then rejected rows: both halves of every pair in one forward pass."""
        return LMBatch.concat([self.chosen, self.rejected])


def require_supported(batch: LMBatch, supported: set[str], where: str) -> None:
    """Refuse optional fields the model cannot honour (never drop them silently)."""
    for name in ("position_ids", "attention_mask"):
        if getattr(batch, name) is not None and name not in supported:
            raise ValueError(f"{where} cannot honour the batch's {name} (supported: "
                             f"{', '.join(sorted(supported)) or 'none'}); training without it "
                             f"would let documents attend to each other or mis-position them")


@dataclass
class RolloutBatch(_Fields):
    """Completions sampled from the policy, ready for a policy-gradient loss
    (apt/trainops/objectives/grpo.py). Rows are prompt + completion, right-padded; like
    ``LMBatch``, ``labels[t]`` is the token after ``tokens[t]`` and ``loss_mask`` (float 0/1)
    selects the completion's tokens (as labels). Per label position [b, s] (0 where masked):
    ``sampler_logps`` the sampler's log-probabilities, ``old_logps`` the policy's before this
    batch's first update (num_iterations > 1; None: the current policy, detached),
    ``ref_logps`` the frozen initial policy's (KL penalty; None without one). Per row [b]:
    ``advantages``, ``rewards`` (the weighted sum), ``zero_std`` (1 when the row's group
    scored all alike), ``stopped`` (1 when the completion ended by itself); ``reward_parts``
    [b, R]: each reward before weighting; ``reward_failures`` [b, R]: 1 where a reward raised.
    ``sample_id`` [b]: the prompt's index."""

    tokens: Tensor
    labels: Tensor
    loss_mask: Tensor
    sampler_logps: Tensor
    advantages: Tensor
    rewards: Tensor
    reward_parts: Tensor
    reward_failures: Tensor
    zero_std: Tensor
    stopped: Tensor
    old_logps: Optional[Tensor] = None
    ref_logps: Optional[Tensor] = None
    sample_id: Optional[Tensor] = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def model_shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def index(self, rows) -> "RolloutBatch":
        return self._map(lambda v: v[rows])

    def as_lm(self) -> LMBatch:
        return LMBatch(self.tokens, self.labels, self.loss_mask, sample_id=self.sample_id)

    def to_dict(self) -> dict:
        return dict(self.items())
