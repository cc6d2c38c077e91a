"""Greedy generation and the chat scorer: held-out assistant-token loss and exact-match.

``score_chats(model, records, tokenizer)`` measures what SFT is for, on one process (TP = PP =
1; every data-parallel rank computes the same numbers):

- ``assistant_loss``: mean next-token loss in nats over the assistant tokens of the records
  (the chat template's loss mask, as training sees it, records unpacked);
- ``exact_match``: the fraction of records whose last assistant answer the model produces
  token for token by greedy decoding after the prompt (the conversation before it with the
  generation prompt), including the end-of-document token: a model that does not stop
  is wrong. ``exact_match_<task>`` per task when records carry a ``task`` field.

``ChatScorer`` holds the records, tokenizer and template once, for evaluation during training.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from apt.trainops.data.tokenizers.chat_template import (BUILTIN, ChatTemplate, last_turn,
                                                        resolve_chat_template, stop_ids)
from apt.trainops.data.datasets.sft import SFTDataset, messages_of


def _single_process(model, what: str) -> None:
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized() and (ps.get_tensor_model_parallel_world_size() > 1 or
                                               ps.get_pipeline_model_parallel_world_size() > 1):
        raise NotImplementedError(f"{what} runs on an unsharded model (TP = PP = 1)")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_generate(model, prompts: list, max_new_tokens, *, stop_id=None,
                    valid_vocab: int | None = None, batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of several prompts (lists of token ids), one forward pass per new
    token over right-padded rows (causal attention: padding after a row's end does not change
    its logits). ``max_new_tokens``: one int or one per prompt. A row stops after ``stop_id``
    (one id or several, such as ``chat_template.stop_ids``; included in its output).
    ``valid_vocab`` masks the padded embedding rows."""
    _single_process(model, "greedy_generate")
    stop_id = (frozenset() if stop_id is None else frozenset({int(stop_id)})
               if np.isscalar(stop_id) else frozenset(int(i) for i in stop_id))
    limits = ([int(max_new_tokens)] * len(prompts) if np.isscalar(max_new_tokens)
              else [int(n) for n in max_new_tokens])
    max_len = getattr(getattr(model, "arch", None), "max_seq_len", None)
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            out += _greedy_rows([list(map(int, p)) for p in prompts[start:start + batch_size]],
                                limits[start:start + batch_size], stop_id, valid_vocab, model,
                                max_len)
    finally:
        model.train(was_training)
    return out


def _greedy_rows(prompts, limits, stop_id, valid_vocab, model, max_len):
    device = _device(model)
    longest = max(len(p) + n for p, n in zip(prompts, limits))
    if max_len and longest > max_len:
        raise ValueError(f"prompt + {max(limits)} new tokens = {longest} tokens exceeds the "
                         f"model's max_seq_len={max_len}")
    rows = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        rows[i, :len(p)] = torch.as_tensor(p, device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    limits_t = torch.tensor(limits, device=device)
    active = limits_t > 0
    generated = [[] for _ in prompts]
    while active.any():
        width = int(lengths[active].max())
        positions = torch.arange(width, device=device).expand(len(prompts), -1)
        logits = model(rows[:, :width], positions, None)          # [b, s, V]
        ends = (lengths - 1).clamp(max=width - 1)    # finished rows may be longer: ignored
        last = logits[torch.arange(len(prompts), device=device), ends].float()
        if valid_vocab:
            last[:, valid_vocab:] = float("-inf")
        next_tokens = last.argmax(-1)
        for i in torch.nonzero(active).flatten().tolist():
            token = int(next_tokens[i])
            generated[i].append(token)
            rows[i, lengths[i]] = token
            lengths[i] += 1
            if len(generated[i]) >= limits[i] or token in stop_id:
                active[i] = False
    return generated


@torch.no_grad()
def assistant_token_loss(model, dataset: SFTDataset, batch_size: int = 32) -> tuple[float, int]:
    """(mean loss in nats over the loss-masked tokens of ``dataset``, how many tokens)."""
    _single_process(model, "assistant_token_loss")
    device = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.get_batch(range(start, min(start + batch_size, len(dataset))))
            batch = batch.to(device)
            loss = model(batch.tokens, batch.position_ids, None, labels=batch.labels)
            total += float((loss.double() * batch.loss_mask.double()).sum())
            count += float(batch.loss_mask.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1.0), int(count)


def score_chats(model, records: list[dict], tokenizer, template: ChatTemplate | None = None, *,
                seq_length: int | None = None, valid_vocab: int | None = None,
                batch_size: int = 32, samples: int = 3) -> dict:
    """Held-out ``assistant_loss`` and ``exact_match`` (see the module docstring), plus
    ``records`` (how many were scored) and ``samples``: the first few (prompt, expected,
    generated) texts."""
    template = template or ChatTemplate(BUILTIN)
    seq_length = seq_length or getattr(getattr(model, "arch", None), "max_seq_len", 128)
    valid_vocab = valid_vocab or tokenizer.vocab_size
    loss, tokens = assistant_token_loss(
        model, SFTDataset(records, tokenizer, seq_length, name="scored chats", template=template),
        batch_size)
    return {"assistant_loss": loss, "assistant_tokens": tokens,
            **answer_scores(model, records, last_turns(records, template, tokenizer), tokenizer,
                            valid_vocab=valid_vocab, batch_size=batch_size, samples=samples)}


def last_turns(records: list[dict], template: ChatTemplate, tokenizer) -> list:
    """(prompt tokens, expected answer tokens) of each record's last assistant turn."""
    return [last_turn(messages_of(r, f"scored chats: record {i}"), template, tokenizer,
                      f"scored chats: record {i}") for i, r in enumerate(records)]


def answer_scores(model, records: list[dict], turns: list, tokenizer, *, valid_vocab: int,
                  batch_size: int = 32, samples: int = 3) -> dict:
    """``exact_match`` (overall and per task) of greedy answers to ``turns``, ``records`` and
    ``samples`` (see ``score_chats``)."""
    # A prompt too long for the model keeps its end, as the training data truncates it.
    max_len = getattr(getattr(model, "arch", None), "max_seq_len", None)
    prompts = [p[max(0, len(p) - (max_len - len(a))):] if max_len else p for p, a in turns]
    answers = greedy_generate(model, prompts, [len(a) for _, a in turns],
                              stop_id=stop_ids(tokenizer), valid_vocab=valid_vocab,
                              batch_size=batch_size)
    hits = [answer == expected.tolist() for answer, (_, expected) in zip(answers, turns)]
    result = {"records": len(records), "exact_match": float(np.mean(hits))}
    by_task = defaultdict(list)
    for record, hit in zip(records, hits):
        if "task" in record:
            by_task[record["task"]].append(hit)
    for task, task_hits in sorted(by_task.items()):
        result[f"exact_match_{task}"] = float(np.mean(task_hits))
    result["samples"] = [{"prompt": tokenizer.decode(p.tolist()),
                          "expected": tokenizer.decode(a.tolist()),
                          "generated": tokenizer.decode(g)}
                         for (p, a), g in list(zip(turns, answers))[:samples]]
    return result


class ChatScorer:
    """``ChatScorer.from_data(cfg.data, tokenizer)(model)``: ``score_chats`` on the held-out
    chats of a profile's SFT data (the validation records training does not see), or of its
    preference pairs (each prompt answered by the chosen answer)."""

    def __init__(self, records: list[dict], tokenizer, template: ChatTemplate | None = None,
                 seq_length: int | None = None, max_records: int | None = None):
        self.records = records[:max_records] if max_records else records
        self.tokenizer, self.template, self.seq_length = tokenizer, template, seq_length
        self._turns = None   # the prompts exact_match() answers, rendered on its first call

    @classmethod
    def from_data(cls, data, tokenizer, max_records: int | None = None) -> "ChatScorer":
        from apt.trainops.data.build import heldout_chats
        return cls(heldout_chats(data), tokenizer,
                   resolve_chat_template(tokenizer, data.chat_template), data.seq_length,
                   max_records)

    def __call__(self, model) -> dict:
        return score_chats(model, self.records, self.tokenizer, self.template,
                           seq_length=self.seq_length)

    def exact_match(self, model) -> dict:
        """Only the greedy answers' scores (a trainer's evaluation has the loss already)."""
        if self._turns is None:
            self._turns = last_turns(self.records, self.template or ChatTemplate(BUILTIN),
                                     self.tokenizer)
        return answer_scores(model, self.records, self._turns, self.tokenizer,
                             valid_vocab=self.tokenizer.vocab_size)
