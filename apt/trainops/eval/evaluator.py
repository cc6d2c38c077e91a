"""Evaluator: loss, perplexity, next-token accuracy and multiple-choice accuracy, on any layout.

Every layout runs the same path: Megatron's own schedule (``get_forward_backward_func()``,
``forward_only=True``) feeds the micro-batches through the pipeline stages (a plain loop when
PP = 1); the last stage turns logits into summed statistics (metrics.py: vocab-parallel loss and
argmax under TP); the sums are gathered from the last stage over the pipeline group and added
over the data-parallel group. Every rank returns the same numbers, equal to a single-process
evaluation of the same weights.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from apt.trainops.data.datasets.batches import LMBatch
from apt.trainops.distributed.engines.forward_only import forward_only
from .coverage import eval_coverage
from apt.trainops.objectives.token_metrics import TOKEN_METRICS, per_token_loss
from .tasks import MultipleChoiceTask, choice_rows

KNOWN_METRICS = TOKEN_METRICS + ("multiple_choice",)


def _groups():
    from megatron.core import parallel_state as ps
    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return ps


class Evaluator:
    """``Evaluator(model, eval_dataset, metrics=["accuracy", "perplexity"]).evaluate()``.

    ``model``: this rank's Megatron model (one pipeline stage, TP shard), not a DeepSpeed engine
    (pass ``engine.module``). Data: ``eval_dataset`` (a TokenDataset: a loader over this rank's
    data-parallel share is built) or ``dataloader``. ``tasks``: multiple-choice task files or
    built-in names (tasks.py), scored when "multiple_choice" is among the metrics (added
    automatically when tasks are given). ``objective``: what the held-out metrics measure (an
    Objective or a name, apt/trainops/objectives; default next-token prediction): the
    Evaluator calls ``objective.evaluate(self, max_batches)``, which for most objectives is
    ``forward_statistics`` (GRPO answers held-out prompts greedily instead, through
    ``chunks``, ``dataloader.dataset``, ``tokenizer`` and ``lockstep_group``).
    ``lockstep_group``: ranks whose forward passes run together (ZeRO-3's data-parallel group,
    distributed/engines/forward_only.py ``lockstep_group``)."""

    def __init__(self, model, eval_dataset=None, metrics=("loss", "perplexity", "accuracy"), *,
                 dataloader=None, micro_batch_size: int = 8, max_batches: int | None = None,
                 tasks=(), tokenizer=None, objective=None, lockstep_group=None):
        # Imported here: objectives use this package's metrics (eval/__init__ imports us).
        from apt.trainops.objectives import build_objective
        self.objective = build_objective(objective or "lm")
        unknown = sorted(set(metrics) - set(KNOWN_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: "
                             f"{', '.join(KNOWN_METRICS)}")
        # Virtual pipeline stages: a list of model chunks (they share one schedule).
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.model = self.chunks[0]
        self.metrics = tuple(metrics) + (("multiple_choice",) if tasks and
                                         "multiple_choice" not in metrics else ())
        self.tasks = [t if isinstance(t, MultipleChoiceTask) else MultipleChoiceTask.load(t)
                      for t in tasks]
        if "multiple_choice" in self.metrics and not self.tasks:
            raise ValueError("metric 'multiple_choice' needs tasks=[<task file>, ...]")
        if self.tasks and tokenizer is None:
            from apt.trainops.data import ByteTokenizer
            tokenizer = ByteTokenizer()
        self.tokenizer = tokenizer
        if dataloader is None and eval_dataset is not None:
            from apt.trainops.data import create_dataloader
            dataloader = create_dataloader(eval_dataset, micro_batch_size, shuffle=False,
                                           infinite=False)
        self.dataloader, self.max_batches = dataloader, max_batches
        self.micro_batch_size = micro_batch_size
        self.lockstep_group = lockstep_group
        # What the last forward-statistics pass scored of the held-out data (coverage.py);
        # None when the objective's evaluation reads no batches or the loader is not ours.
        self.coverage = None

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict:
        was_training = self.model.training
        for chunk in self.chunks:
            chunk.eval()
        try:
            result = {}
            if self.dataloader is not None and set(self.metrics) & set(TOKEN_METRICS):
                # the objective's own metrics (the one seam: never asked which it is)
                result.update(self.objective.evaluate(self, max_batches or self.max_batches))
            if "multiple_choice" in self.metrics:
                for task in self.tasks:
                    result.update(self.evaluate_multiple_choice(task))
        finally:
            for chunk in self.chunks:
                chunk.train(was_training)
        return result

    @torch.no_grad()
    def evaluate_multiple_choice(self, task: MultipleChoiceTask) -> dict:
        ps = _groups()
        dp_rank, dp_size = (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()) \
            if ps else (0, 1)
        mine = list(range(dp_rank, len(task.questions), dp_size))
        from megatron.core.utils import get_attr_wrapped_model  # through Float16Module etc.
        max_len = get_attr_wrapped_model(self.model, "max_sequence_length")
        rows, length = choice_rows(task, self.tokenizer, mine, None, max_len)
        mbs = self.micro_batch_size
        while len(rows) % mbs or not rows:  # fixed micro-batch shape: pad with masked rows
            rows.append((torch.full((length,), self.tokenizer.pad_id),
                         torch.full((length,), self.tokenizer.pad_id), torch.zeros(length)))
        batches = [self._batch([r[0] for r in chunk], [r[1] for r in chunk],
                               [r[2] for r in chunk]) for chunk in
                   (rows[i:i + mbs] for i in range(0, len(rows), mbs))]
        outputs = forward_only(self.chunks, batches, self._loglik_step)
        totals = torch.zeros(3, dtype=torch.float64, device=self._device())
        if outputs:  # the last pipeline stage
            loglik = torch.cat([o["loglik"] for o in outputs]).tolist()
            cursor = 0
            for qi in mine:
                q = task.questions[qi]
                scores = loglik[cursor:cursor + len(q.choices)]
                cursor += len(q.choices)
                lengths = [max(1, len(c.encode("utf-8"))) for c in q.choices]
                normed = [s / n for s, n in zip(scores, lengths)]
                totals[0] += float(max(range(len(scores)), key=scores.__getitem__) == q.answer)
                totals[1] += float(max(range(len(normed)), key=normed.__getitem__) == q.answer)
                totals[2] += 1
        correct, correct_norm, n = self._reduce(totals).tolist()
        prefix = f"mc_{task.name}"
        return {f"{prefix}_acc": correct / max(n, 1), f"{prefix}_acc_norm": correct_norm / max(n, 1),
                f"{prefix}_questions": int(n)}

    def forward_statistics(self, max_batches: int | None = None) -> dict:
        """The objective's forward-pass evaluation (``Objective.evaluate``'s default): its
        ``eval_forward_step`` statistics over at most ``max_batches`` micro-batches of this
        rank's held-out loader, summed over batches and ranks, turned into ``eval_metrics``."""
        self.coverage = eval_coverage(self.dataloader, max_batches)
        batches = []
        for i, batch in enumerate(self.dataloader):
            if max_batches is not None and i >= max_batches:
                break
            batches.append(self.objective.coerce(batch).to(self._device()))
        # e.g. the preference reference's log-probs, from a forward pass of their own
        batches = self.objective.prepare(batches, partial(forward_only, self.chunks))
        names = self.objective.eval_stat_names
        totals = torch.zeros(len(names), dtype=torch.float64, device=self._device())
        for stats in forward_only(self.chunks, batches, self.objective.eval_forward_step):
            totals += torch.stack([stats[n].to(torch.float64) for n in names])
        sums = dict(zip(names, self._reduce(totals).tolist()))
        return self.objective.eval_metrics(sums, self.metrics)

    # ------------------------------------------------------------------ internals
    def _device(self):
        return next(self.model.parameters()).device

    def _batch(self, tokens, labels, mask) -> LMBatch:
        stack = (lambda x: torch.stack(list(x)) if isinstance(x, (list, tuple)) else x)
        return LMBatch(stack(tokens).long(), stack(labels).long(),
                       stack(mask).float()).to(self._device())

    def _loglik_step(self, model, batch: LMBatch):
        """Multiple choice scores the model as a language model, whatever it is trained for."""
        from apt.trainops.objectives import lm_output
        return lm_output(model, batch, labels=False), partial(self._loglik_stats, batch)

    def _loglik_stats(self, batch: LMBatch, logits):
        loss = per_token_loss(self.model, logits, batch.labels).double()
        return {"loglik": -(loss * batch.loss_mask.double()).sum(dim=1)}

    @staticmethod
    def _reduce(totals: torch.Tensor) -> torch.Tensor:
        """Last stage's sums to every stage (others hold zeros), then summed over DP ranks."""
        ps = _groups()
        if ps is None:
            return totals
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        return totals
