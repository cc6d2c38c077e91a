"""How many held-out samples an evaluation scores, and why any others are left out.

Evaluation reads the held-out split through the same global-batch sampler as training (so
every layout scores the same samples): it takes whole global batches only, and at most
``training.eval_batches`` micro-batches per data-parallel rank; a dataset may also have
dropped records when it was built (an answer that ``data.seq_length`` cuts off entirely).
Issue 30: DPO's held-out preference accuracy covered 288 of 300 pairs and did not say why
(300 pairs fill 9 global batches of 32, and 12 are left over).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Coverage:
    scored: int                                 # held-out samples the evaluation scores
    total: int                                  # records of the held-out split, dropped included
    left_out: list[str] = field(default_factory=list)   # "N <why>", one per reason

    def line(self) -> str:
        """``"scored 288 of 300 held-out samples; left out: 12 after ..."``."""
        text = f"scored {self.scored} of {self.total} held-out samples"
        return text + ("; left out: " + "; ".join(self.left_out) if self.left_out else "")


def eval_coverage(dataloader, max_batches: int | None) -> Coverage | None:
    """What ``Evaluator.evaluate(max_batches)`` over ``dataloader`` scores; None for a loader
    that is not ours (a user's own, without a global-batch sampler)."""
    sampler = getattr(dataloader, "batch_sampler", None)
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or not hasattr(sampler, "batches_per_epoch"):
        return None
    size, left_out = len(dataset), []
    scored = sampler.batches_per_epoch * sampler.global_batch
    if scored < size:
        left_out.append(f"{size - scored} after the last whole global batch of "
                        f"{sampler.global_batch} (training.batch_size: evaluation takes whole "
                        f"global batches, as training does)")
    if max_batches is not None:
        cap = max_batches * sampler.micro_batch * sampler.dp_size
        if cap < scored:
            left_out.append(f"{scored - cap} beyond training.eval_batches={max_batches} "
                            f"micro-batches of {sampler.micro_batch} per data-parallel rank")
            scored = cap
    dropped = int(getattr(dataset, "dropped", 0) or 0)
    if dropped:
        left_out.append(f"{dropped} dropped when the data was read (data.seq_length cuts "
                        f"their answer off entirely)")
    return Coverage(scored, size + dropped, left_out)
