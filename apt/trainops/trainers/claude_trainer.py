"""ClaudeTrainer: preference alignment (the DPO family) on the one training loop.

The seed's name for training on pairs of a preferred and a rejected answer. The loss, its
metrics and the reference model are the objective's (apt/trainops/objectives/preference.py,
reference.py); this class adds what an alignment user expects around them:
- ``training.dpo.reference: precomputed``: the reference's log-probabilities of every pair,
  computed once before the first step (cached with the data), after which no reference
  weights are held;
- an evaluation before the first step and after the last: held-out preference accuracy
  (``val_rewards/accuracies``) and, for the profile's own pairs where this process holds the
  whole model, exact-match of greedy answers against the chosen ones (``val_exact_match``:
  does the model now *say* the preferred answer?).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from apt.core.config import APTConfig, with_overrides
from apt.trainops.distributed.engines.forward_only import forward_only
from apt.trainops.objectives import PreferenceObjective
from apt.trainops.objectives.reference import precompute
from .checkpointing import layout_of
from .trainer import Trainer


class ClaudeTrainer(Trainer):
    """``ClaudeTrainer(model=model, train_dataset=pairs, eval_dataset=held_out, beta=0.1,
    loss_type="sigmoid").train()``: DPO-family training on PreferenceDataset pairs (or a
    profile with ``data.corpus: preference``). Keyword arguments override ``training.dpo``."""

    eval_before_training = True

    def __init__(self, model=None, train_dataset=None, eval_dataset=None, *,
                 config: APTConfig | None = None, beta: float | None = None,
                 loss_type: str | None = None, reference: str | None = None, **kwargs):
        cfg = config or APTConfig(model=getattr(model, "arch", APTConfig().model))
        overrides = {f"training.dpo.{k}": v for k, v in
                     (("beta", beta), ("loss_type", loss_type), ("reference", reference))
                     if v is not None}
        if overrides:
            cfg = with_overrides(cfg, overrides)
        kwargs.setdefault("objective", PreferenceObjective(cfg.training.dpo))
        super().__init__(model=model, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         config=cfg, **kwargs)
        objective = self.objective
        if objective.needs_reference and cfg.training.dpo.reference == "precomputed":
            self._precompute_reference()
        self.chat_scorer = self.profile_chat_scorer(own_data=train_dataset is None)

    def _precompute_reference(self) -> None:
        """Every pair's reference log-probs, once; then the reference weights are dropped."""
        reference = self.objective.reference
        cache = Path(self.config.data.cache_dir or Path.home() / ".cache" / "apt" / "reference")
        for loader in (self.train_dataloader, self.eval_dataloader):
            dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "set_reference_logps"):
                continue
            dataset.set_reference_logps(precompute(
                dataset, self.plan.micro_batch, partial(forward_only, self.modules),
                self.objective.logps_step, reference, cache, str(layout_of(self.plan)),
                self.objective.coerce, self.runtime.device))
        reference.release()
