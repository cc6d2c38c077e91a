"""Prompts for reinforcement learning: what the policy answers and the rewards check.

A record is ``{"prompt": str, ...}`` or ``{"messages": [...], ...}``: the conversation the
policy answers, rendered by the chat template with the generation prompt. Every other field
(``answer``, ``tests``, ``task``...) is kept for the rewards (apt/trainops/rewards). A chat
whose last message is the assistant's (an SFT record) becomes a prompt: the messages before it,
and its content as ``answer`` unless the record has one, so SFT data (``synthetic:arith``)
doubles as a checkable task.

A prompt longer than ``max_prompt_length`` tokens keeps its end (the question is usually
last), counted in ``truncated`` with the tokens it lost in ``tokens_cut``; ``truncation()``
says so in words, for the trainer's start line. ``PromptDataset.get_batch`` returns a
``PromptBatch``: the token ids of each prompt (ragged), its record and its global index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from ..tokenizers.chat_template import (BUILTIN, ChatTemplate, checked_messages, render_or_fail,
                                        tokens_of)
from .tokens import BatchIndexed


@dataclass
class PromptBatch:
    """Prompts for the sampler: ``prompts[i]`` token ids (1-D int64, ragged), ``records[i]``
    the record's fields for the rewards, ``texts[i]`` the rendered prompt, ``sample_id`` [b]."""

    prompts: list
    records: list
    texts: list
    sample_id: torch.Tensor

    @property
    def rows(self) -> int:
        return len(self.prompts)

    def to(self, device, non_blocking: bool = False) -> "PromptBatch":
        return self   # token lists are moved by the sampler, rows at a time

    @classmethod
    def from_dict(cls, data: dict) -> "PromptBatch":
        return cls(**data)


def prompt_of(record, where: str) -> tuple[list[dict], dict]:
    """(messages to answer, the record's fields for the rewards); a bad record is a DataError
    naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(where, "a prompt record must be a JSON object")
    fields = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
    if "messages" in record:
        messages = checked_messages(record["messages"], where)
        if messages[-1]["role"] == "assistant":
            fields.setdefault("answer", messages[-1]["content"])
            messages = messages[:-1]
        if not messages:
            raise DataError(where, "'messages' holds no prompt before the assistant's answer")
        return messages, fields
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}], fields
    raise DataError(where, "a prompt record needs 'prompt' (a string) or 'messages'")


class PromptDataset(BatchIndexed):
    """Prompts as ``PromptBatch``es (see the module docstring). ``required_fields``: record
    fields the rewards read; a record without one is refused here, before training, naming
    it (``locations[i]``: ``file:line``)."""

    def __init__(self, records: list[dict], tokenizer, max_prompt_length: int, *,
                 name: str = "prompts", template: ChatTemplate | None = None,
                 locations: list[str] | None = None, required_fields=()):
        template = template or ChatTemplate(BUILTIN)
        self.name, self.max_prompt_length = name, max_prompt_length
        self.prompts, self.records, self.texts = [], [], []
        self.truncated, self.tokens_cut = 0, []
        if not records:
            raise DataError(name, "no prompt records")
        for i, record in enumerate(records):
            where = locations[i] if locations else f"{name}: record {i}"
            messages, fields = prompt_of(record, where)
            missing = [f for f in sorted(required_fields) if f not in fields]
            if missing:
                raise DataError(where, f"the prompt record has no {', '.join(map(repr, missing))}"
                                       f" field, which training.grpo.rewards need")
            text = render_or_fail(template, messages, True, where)
            tokens = tokens_of(tokenizer, text)
            if len(tokens) > max_prompt_length:
                self.tokens_cut.append(len(tokens) - max_prompt_length)
                tokens = tokens[len(tokens) - max_prompt_length:]
                self.truncated += 1
            self.prompts.append(tokens.astype(np.int64))
            self.records.append(fields)
            self.texts.append(text)

    def truncation(self) -> str:
        """``"945 of 3709 cut from the front by 1..40 tokens (mean 12.3)"``, or ``"none of 3709
        longer"``."""
        if not self.truncated:
            return f"none of {len(self)} longer"
        cut = self.tokens_cut
        return (f"{self.truncated} of {len(self)} cut from the front by {min(cut)}..{max(cut)} "
                f"tokens (mean {sum(cut) / len(cut):.1f})")

    def __len__(self) -> int:
        return len(self.prompts)

    def get_batch(self, indices) -> PromptBatch:
        indices = [int(i) for i in indices]
        return PromptBatch([torch.from_numpy(self.prompts[i]) for i in indices],
                           [self.records[i] for i in indices], [self.texts[i] for i in indices],
                           torch.tensor(indices, dtype=torch.long))

    def __getitem__(self, index: int) -> PromptBatch:
        return self.get_batch([index])
