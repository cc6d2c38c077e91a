"""Supervised fine-tuning data from JSONL records.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ...,
"response": ...}`` (``instruction``/``input``/``output`` is read as prompt and response). A chat
template (chat_template.py: the tokenizer's own, or the built-in ``<|role|>\\n{content}\\n``)
renders it; only the assistant's tokens, found by rendering prefixes, and the end-of-document
token after a final assistant turn are trained (loss mask 1), never the prompt.

``SFTDataset`` returns ``LMBatch``es. With ``packing=True`` several records share a sample
(greedy, in record order): position ids restart at 0 for each record and a block-diagonal causal
``attention_mask`` confines attention to the record; the loss never crosses a record boundary.
A record whose assistant tokens ``seq_length`` cuts off entirely is dropped and counted.
Preference pairs are preference.py's."""
from __future__ import annotations

import logging

import numpy as np
import torch

from .batches import LMBatch
from ..tokenizers.chat_template import BUILTIN, ChatTemplate, encode_chat
from .tokens import BatchIndexed, block_causal_mask
from ..errors import DataError

log = logging.getLogger(__name__)


def messages_of(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and "role" in m and "content" in m
                           for m in messages)):
            raise DataError(where, "'messages' must be a non-empty list of {role, content}")
        return messages
    prompt = record.get("prompt", record.get("instruction"))
    response = record.get("response", record.get("output"))
    if prompt is None or response is None:
        raise DataError(where, "record needs 'messages', or 'prompt' and 'response'")
    if record.get("input"):
        prompt = f"{prompt}\n{record['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def render(messages: list[dict], tokenizer, template: ChatTemplate | None = None,
           where: str = "record") -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the chat template (built-in by default) and the assistant-token loss mask."""
    return encode_chat(messages, template or ChatTemplate(BUILTIN), tokenizer, where)


class SFTDataset(BatchIndexed):
    """Chat records as ``LMBatch`` rows of ``seq_length`` tokens (see the module docstring).

    ``dropped``: how many records were left out because truncation to ``seq_length + 1``
    tokens removed every assistant token (a row with nothing to train is never produced)."""

    def __init__(self, records: list[dict], tokenizer, seq_length: int, *, packing: bool = False,
                 name: str = "sft", template: ChatTemplate | None = None):
        self.seq_length, self.name, self.packing = seq_length, name, packing
        template = template or ChatTemplate(BUILTIN)
        width = seq_length + 1
        self.dropped = 0
        rows = []  # each row: list of (tokens, mask) records sharing one sample
        for i, record in enumerate(records):
            where = f"{name}: record {i}"
            tokens, mask = encode_chat(messages_of(record, where), template, tokenizer, where)
            tokens, mask = tokens[:width], mask[:width]
            if not mask[1:].any():  # position 0 is never a label
                self.dropped += 1
                continue
            if packing and rows and sum(len(t) for t, _ in rows[-1]) + len(tokens) <= width:
                rows[-1].append((tokens, mask))
            else:
                rows.append([(tokens, mask)])
        if self.dropped:
            log.warning("%s: dropped %d of %d records whose assistant tokens data.seq_length=%d "
                        "cuts off entirely", name, self.dropped, len(records), seq_length)
        if not rows:
            raise DataError(name, f"no trainable tokens: all {len(records)} records have their "
                                  f"assistant tokens cut off by data.seq_length={seq_length}")
        n = len(rows)
        self.tokens = np.full((n, width), tokenizer.pad_id, dtype=np.int64)
        self.mask = np.zeros((n, width), dtype=np.float32)
        self.segment = np.full((n, width), -1, dtype=np.int64)
        self.positions = np.zeros((n, width), dtype=np.int64)
        for i, row in enumerate(rows):
            at = 0
            for s, (tokens, mask) in enumerate(row):
                end = at + len(tokens)
                self.tokens[i, at:end], self.mask[i, at:end] = tokens, mask
                self.segment[i, at:end], self.positions[i, at:end] = s, np.arange(len(tokens))
                at = end
        self.num_records = sum(len(row) for row in rows)

    def __len__(self) -> int:
        return len(self.tokens)

    def get_batch(self, indices) -> LMBatch:
        i = np.asarray(indices, dtype=np.int64)
        tokens, mask, segment = self.tokens[i], self.mask[i], self.segment[i][:, :-1]
        # Label t+1 is trained when it is assistant text of the same record as input t.
        loss = mask[:, 1:] * (self.segment[i][:, 1:] == segment)
        batch = LMBatch(tokens=torch.from_numpy(tokens[:, :-1]),
                        labels=torch.from_numpy(tokens[:, 1:]),
                        loss_mask=torch.from_numpy(loss.astype(np.float32)),
                        sample_id=torch.from_numpy(i))
        if self.packing:   # unpacked rows: one record from position 0, plain causal attention
            batch.position_ids = torch.from_numpy(self.positions[i][:, :-1])
            # Padding (segment -1) attends to padding only, so no row is fully masked.
            batch.attention_mask = block_causal_mask(torch.from_numpy(segment))
        return batch
