"""Supervised fine-tuning and preference data from JSONL records.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ...,
"response": ...}`` (``instruction``/``input``/``output`` is read as prompt and response). The
template renders each message as ``<|role|>\\n{content}\\n``; only the assistant's content and
the end-of-document token after the last turn are trained (loss mask 1), never the prompt.

``SFTDataset(packing=True)`` packs several records into each sample (greedy, in record order),
with position ids restarting per record and the loss never crossing a record boundary.
``PreferenceDataset`` reads ``{"prompt", "chosen", "rejected"}`` pairs for alignment."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .batches import LMBatch
from .datasets import BatchIndexed
from .errors import DataError


def iter_jsonl(path):
    """(``file:line``, record) for each non-blank line; a bad line is a one-line DataError."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}", f"invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}", "a record must be a JSON object")
            yield f"{path}:{line_no}", record


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    records = [record for _, record in iter_jsonl(path)]
    if not records:
        raise DataError(path, "empty dataset: no records")
    return records


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


def render(messages: list[dict], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the chat template and a mask that is 1 on the assistant's content (and the
    final end-of-document token)."""
    pieces, masks = [], []

    def add(text: str, trained: bool):
        ids = tokenizer.encode(text)
        pieces.append(ids)
        masks.append(np.full(len(ids), trained, dtype=np.float32))

    for message in messages:
        assistant = message["role"] == "assistant"
        add(f"<|{message['role']}|>\n", False)
        add(str(message["content"]), assistant)
        add("\n", False)
    pieces.append(np.array([tokenizer.eod_id]))
    masks.append(np.ones(1, dtype=np.float32))
    return np.concatenate(pieces).astype(np.int64), np.concatenate(masks)


class SFTDataset(BatchIndexed):
    def __init__(self, records: list[dict], tokenizer, seq_length: int, *, packing: bool = False,
                 name: str = "sft"):
        self.seq_length, self.name, self.packing = seq_length, name, packing
        width = seq_length + 1
        rendered = [render(messages_of(r, f"{name}: record {i}"), tokenizer)
                    for i, r in enumerate(records)]
        rows = []  # each row: list of (tokens, mask) records sharing one sample
        for tokens, mask in rendered:
            tokens, mask = tokens[:width], mask[:width]
            if packing and rows and sum(len(t) for t, _ in rows[-1]) + len(tokens) <= width:
                rows[-1].append((tokens, mask))
            else:
                rows.append([(tokens, mask)])
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
        if not self.mask[:, 1:].any():
            raise DataError(name, "no trainable tokens: every assistant response is empty or "
                                  "cut off by data.seq_length")

    def __len__(self) -> int:
        return len(self.tokens)

    def get_batch(self, indices) -> dict:
        i = np.asarray(indices, dtype=np.int64)
        tokens, mask, segment = self.tokens[i], self.mask[i], self.segment[i]
        # Label t+1 is trained when it is response text of the same record as input t.
        loss = mask[:, 1:] * (segment[:, 1:] == segment[:, :-1])
        return LMBatch(tokens=torch.from_numpy(tokens[:, :-1]),
                       labels=torch.from_numpy(tokens[:, 1:]),
                       loss_mask=torch.from_numpy(loss.astype(np.float32)),
                       position_ids=torch.from_numpy(np.maximum(self.positions[i][:, :-1], 0))
                       if self.packing else None,
                       sample_id=torch.from_numpy(i))


class PreferenceDataset(Dataset):
    """Pairs for DPO-style alignment: ``chosen_*`` and ``rejected_*`` tokens, labels and loss
    masks (response tokens only), padded to ``seq_length``."""

    def __init__(self, records: list[dict], tokenizer, seq_length: int, name: str = "preference"):
        self.seq_length, self.name = seq_length, name
        self.sides = {}
        for side in ("chosen", "rejected"):
            rows = []
            for i, r in enumerate(records):
                where = f"{name}: record {i}"
                if "prompt" not in r or side not in r:
                    raise DataError(where, "a preference record needs 'prompt', 'chosen' and "
                                           "'rejected'")
                rows.append(render([{"role": "user", "content": r["prompt"]},
                                    {"role": "assistant", "content": r[side]}], tokenizer))
            self.sides[side] = _pad(rows, seq_length + 1, tokenizer.pad_id)

    def __len__(self) -> int:
        return len(self.sides["chosen"][0])

    def __getitem__(self, index: int) -> dict:
        item = {"sample_id": torch.tensor(index),
                "position_ids": torch.arange(self.seq_length)}
        for side, (tokens, mask) in self.sides.items():
            item[f"{side}_tokens"] = torch.from_numpy(tokens[index, :-1])
            item[f"{side}_labels"] = torch.from_numpy(tokens[index, 1:])
            item[f"{side}_loss_mask"] = torch.from_numpy(mask[index, 1:])
        return item


def _pad(rows, width: int, pad_id: int):
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    for i, (t, m) in enumerate(rows):
        tokens[i, :min(len(t), width)], mask[i, :min(len(m), width)] = t[:width], m[:width]
    return tokens, mask
