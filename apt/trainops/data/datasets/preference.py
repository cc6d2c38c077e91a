"""Preference pairs for alignment (DPO and its family): a prompt, a chosen and a rejected answer.

A record is ``{"prompt": str, "chosen": str, "rejected": str}`` or the chat form
``{"messages": [...a conversation ending with a user turn...], "chosen": ..., "rejected": ...}``
where an answer is a string or ``{"role": "assistant", "content": str}``.

The prompt is the conversation rendered by the chat template with the generation prompt. Each
answer is tokenised on its own, never together with the prompt, so no token merges across the
boundary (with a BPE, ``"=" + "85"`` tokenised jointly could become one token and the answer's
first token would not be the model's first choice after the prompt). An answer's tokens are
exactly what SFT trains for an assistant turn that ends the conversation (chat_template.py's
``encode_chat``): the text the template adds after the generation prompt, up to and including
its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``); with a template that has none (the
built-in one), all of it and the end-of-document token.

Each half of a pair is one row ``prompt + answer`` right-padded to ``seq_length + 1``; the
loss mask is 1 exactly on the answer's label positions. A pair longer than that keeps the end of
its prompt (at most ``max_prompt_length`` tokens, default half the row) and cuts its answers; a
pair where either answer keeps no trainable token (``max_prompt_length`` set to the row length
or more keeps long prompts whole at that cost) is dropped and counted (``dropped``), never
trained as an all-masked row.

``PreferenceDataset.get_batch`` returns one ``PreferenceBatch`` (batches.py): both halves of
every pair in the same micro-batch, with the reference model's log-probabilities when they were
precomputed (``set_reference_logps``; ``fingerprint()`` keys their cache).
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from .batches import LMBatch, PreferenceBatch
from ..tokenizers.chat_template import (BUILTIN, ChatTemplate, answer_tokens, checked_messages,
                                        render_or_fail, tokens_of)
from .tokens import BatchIndexed
from ..errors import DataError

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")


def pair_of(record: dict, where: str) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of a record; a bad one is a DataError
    naming ``where`` and what is missing or wrong."""
    if not isinstance(record, dict):
        raise DataError(where, "a preference record must be a JSON object")
    if "messages" in record:
        messages = checked_messages(record["messages"], where)
        if messages[-1]["role"] != "user":
            raise DataError(where, f"'messages' must end with a user turn (the answers reply "
                                   f"to it), not {messages[-1]['role']!r}")
    elif "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise DataError(where, "'prompt' must be a string")
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise DataError(where, "a preference record needs 'prompt' (or 'messages'), "
                               "'chosen' and 'rejected'")
    answers = []
    for side in SIDES:
        if side not in record:
            raise DataError(where, f"missing field '{side}' (a preference record needs "
                                   f"'prompt' or 'messages', 'chosen' and 'rejected')")
        answer = record[side]
        if isinstance(answer, dict):
            if answer.get("role", "assistant") != "assistant" or \
                    not isinstance(answer.get("content"), str):
                raise DataError(where, f"'{side}' must be a string or "
                                       f"{{\"role\": \"assistant\", \"content\": <string>}}")
            answer = answer["content"]
        elif not isinstance(answer, str):
            raise DataError(where, f"'{side}' must be a string or "
                                   f"{{\"role\": \"assistant\", \"content\": <string>}}")
        answers.append(answer)
    return messages, answers[0], answers[1]


def encode_pair(messages: list[dict], answers: list[str], template: ChatTemplate, tokenizer,
                where: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(prompt tokens, [answer tokens per answer]). The answer's text is what rendering the
    conversation with the answer adds to rendering it with the generation prompt; it is
    tokenised alone and ends with its end-of-turn token (what follows it is the template's),
    or with the end-of-document token when the template has none (``answer_tokens``)."""
    prompt_text = render_or_fail(template, messages, True, where)
    prompt = tokens_of(tokenizer, prompt_text)
    out = []
    for answer in answers:
        full_text = render_or_fail(template, messages + [{"role": "assistant", "content": answer}],
                            False, where)
        if not full_text.startswith(prompt_text):
            raise DataError(where, f"chat template {template.name}: the conversation with the "
                                   f"answer does not start with the conversation with the "
                                   f"generation prompt, so the answer's text cannot be told "
                                   f"apart (use data.chat_template=builtin or fix the template)")
        out.append(answer_tokens(tokens_of(tokenizer, full_text[len(prompt_text):]), tokenizer))
    return prompt, out


def fit_pair(prompt: np.ndarray, answers: list[np.ndarray], width: int,
             max_prompt_length: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cut a pair to rows of ``width`` tokens: when a row is too long the prompt keeps its last
    ``max_prompt_length`` tokens (the same prompt for both answers), then the answers are cut."""
    if len(prompt) + max(len(a) for a in answers) > width:
        prompt = prompt[max(0, len(prompt) - max_prompt_length):]
    room = max(0, width - len(prompt))
    return prompt, [a[:room] for a in answers]


class PreferenceDataset(BatchIndexed):
    """Preference pairs as ``PreferenceBatch``es of ``seq_length`` tokens per row (see the
    module docstring). ``locations`` names each record in errors (``file:line``); by default
    ``<name>: record <i>``. ``dropped``: pairs left out because truncation removed every token
    of an answer. ``record_index[i]``: the record pair ``i`` came from."""

    def __init__(self, records: list[dict], tokenizer, seq_length: int, *,
                 name: str = "preference", template: ChatTemplate | None = None,
                 max_prompt_length: int | None = None, locations: list[str] | None = None):
        width = seq_length + 1
        max_prompt_length = max_prompt_length or width // 2
        self.seq_length, self.name, self.max_prompt_length = seq_length, name, max_prompt_length
        template = template or ChatTemplate(BUILTIN)
        self.dropped = 0
        kept, indices = [], []
        for i, record in enumerate(records):
            where = locations[i] if locations else f"{name}: record {i}"
            messages, chosen, rejected = pair_of(record, where)
            prompt, answers = encode_pair(messages, [chosen, rejected], template, tokenizer,
                                          where)
            prompt, answers = fit_pair(prompt, answers, width, max_prompt_length)
            # Answer token k is the label at row position len(prompt) + k - 1 >= 0.
            if any(len(a) - (len(prompt) == 0) <= 0 for a in answers):
                self.dropped += 1
                continue
            kept.append((prompt, answers))
            indices.append(i)
        if self.dropped:
            log.warning("%s: dropped %d of %d preference pairs whose chosen or rejected answer "
                        "data.seq_length=%d cuts off entirely", name, self.dropped, len(records),
                        seq_length)
        if not kept:
            raise DataError(name, f"no trainable pairs: all {len(records)} pairs have an answer "
                                  f"cut off by data.seq_length={seq_length}")
        n = len(kept)
        # [pair, side, position]; mask[.., j] = 1 when row token j is an answer token (a label).
        self.tokens = np.full((n, 2, width), tokenizer.pad_id, dtype=np.int64)
        self.mask = np.zeros((n, 2, width), dtype=np.float32)
        for i, (prompt, answers) in enumerate(kept):
            for s, answer in enumerate(answers):
                end = len(prompt) + len(answer)
                self.tokens[i, s, :len(prompt)] = prompt
                self.tokens[i, s, len(prompt):end] = answer
                self.mask[i, s, len(prompt):end] = 1
        self.mask[:, :, 0] = 0   # position 0 is never a label
        self.record_index = np.asarray(indices, dtype=np.int64)
        self.reference_logps = None

    def __len__(self) -> int:
        return len(self.tokens)

    def set_reference_logps(self, logps) -> None:
        """Store the reference model's summed answer log-probs, [len(self), 2] (chosen,
        rejected) in pair order; ``get_batch`` returns them (float64). None clears them."""
        if logps is None:
            self.reference_logps = None
            return
        logps = np.asarray(logps.cpu() if isinstance(logps, torch.Tensor) else logps,
                           dtype=np.float64)
        if logps.shape != (len(self), 2):
            raise ValueError(f"{self.name}: reference log-probs have shape {logps.shape}, "
                             f"expected ({len(self)}, 2)")
        if not np.isfinite(logps).all():
            raise ValueError(f"{self.name}: reference log-probs are not all finite")
        self.reference_logps = logps

    def fingerprint(self) -> str:
        """A stable hash of the tokenised pairs and the row length: what precomputed reference
        log-probs depend on besides the reference weights."""
        digest = hashlib.sha256()
        digest.update(f"preference-v1 seq_length={self.seq_length} "
                      f"shape={self.tokens.shape}".encode())
        digest.update(np.ascontiguousarray(self.tokens, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(self.mask, dtype="<f4").tobytes())
        return digest.hexdigest()

    def get_batch(self, indices) -> PreferenceBatch:
        i = np.asarray(indices, dtype=np.int64)
        if len(i) and (i.min() < 0 or i.max() >= len(self)):
            raise IndexError(f"{self.name}: pair index out of range [0, {len(self)})")
        tokens, mask = self.tokens[i], self.mask[i]
        sample_id = torch.from_numpy(i)
        halves = [LMBatch(tokens=torch.from_numpy(tokens[:, s, :-1]),
                          labels=torch.from_numpy(tokens[:, s, 1:]),
                          loss_mask=torch.from_numpy(mask[:, s, 1:]),
                          sample_id=sample_id)
                  for s in range(2)]
        reference = (None if self.reference_logps is None
                     else torch.from_numpy(self.reference_logps[i]))
        return PreferenceBatch(halves[0], halves[1], sample_id=sample_id,
                               reference_logps=reference)


def pairs_as_chats(records: list[dict], locations: list[str] | None = None) -> list[dict]:
    """Each pair as a chat whose last assistant turn is the chosen answer: what the chat scorer
    (apt/trainops/eval/generation.py) asks a model to produce."""
    chats = []
    for i, record in enumerate(records):
        messages, chosen, _ = pair_of(record, locations[i] if locations else f"record {i}")
        chat = {"messages": messages + [{"role": "assistant", "content": chosen}]}
        if "task" in record:
            chat["task"] = record["task"]
        chats.append(chat)
    return chats
