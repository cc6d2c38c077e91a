"""Preference alignment: the DPO family (sigmoid DPO, IPO, hinge, robust, SimPO, + RPO's SFT term).

A batch holds pairs (PreferenceBatch); both answers of every pair go through the model in one
forward pass (chosen rows then rejected rows), so the two halves always sit in the same
micro-batch, on every pipeline stage. The model returns the per-token cross-entropy (Megatron's
vocab-parallel one under TP); an answer's log-probability is minus its sum over the answer's
tokens (the loss mask). With the reference's log-probabilities (reference.py), per pair:

    chosen reward  r_c = beta * (logp_c - ref_c)         rejected reward r_r likewise
    sigmoid  -(1-eps) log s(r_c - r_r) - eps log s(r_r - r_c)               (eps: cDPO)
    robust   [-(1-eps) log s(r_c - r_r) + eps log s(r_r - r_c)] / (1 - 2 eps)
    hinge    relu(1 - (r_c - r_r))
    ipo      ((logp_c - ref_c)/n_c - (logp_r - ref_r)/n_r - 1/(2 beta))^2  (per-token log-ratios)
    simpo    -(1-eps) log s(beta logp_c/n_c - beta logp_r/n_r - gamma) - eps log s(-...)
                                                                     (no reference; n: tokens)
    + sft_weight * (-logp_c / n_c)                     (RPO; sft_normalize: pair)

The loss is summed over pairs (the engine divides by the global batch's pair count). With
``sft_normalize: token`` the SFT term is one token mean over the chosen answers of the whole
global batch (TRL's ``rpo_alpha`` and ``loss_type=["sigmoid", "sft"]``), so after that division
the loss is mean over pairs of the preference loss + sft_weight * sum(-logp_c) / sum(n_c):
``prepare`` counts the step's pairs and chosen tokens over every micro-batch and data-parallel
rank, and each micro-batch adds sft_weight * (pairs / tokens) * sum(-logp_c) of its own. Logged per
step and per evaluation: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies`` (the share of pairs with r_c strictly above r_r) and ``logps/chosen``,
``logps/rejected`` (means over pairs). At step 0 the policy is the reference: every reward is 0
and the sigmoid loss is ln 2.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from apt.trainops.data.datasets.batches import PreferenceBatch
from .base import Objective
from .lm import lm_output
from .reference import FrozenReference

PAIR_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "rewards/accuracies", "logps/chosen", "logps/rejected")


def answer_logps(batch: PreferenceBatch, per_token: torch.Tensor):
    """(log-probabilities [b, 2], answer lengths [b, 2]) in float64 of both answers per pair,
    from the per-token cross-entropy of the stacked batch."""
    rows = batch.rows
    mask = torch.cat([batch.chosen.loss_mask, batch.rejected.loss_mask]).to(torch.float64)
    logps = -(per_token.to(torch.float64) * mask).sum(dim=-1)
    lengths = mask.sum(dim=-1)
    return (torch.stack([logps[:rows], logps[rows:]], dim=1),
            torch.stack([lengths[:rows], lengths[rows:]], dim=1))


class PreferenceObjective(Objective):
    name = "dpo"
    batch_type = PreferenceBatch
    stat_names = PAIR_STATS
    eval_stat_names = PAIR_STATS + ("pairs",)

    def __init__(self, config=None):
        from apt.core.config import DPOConfig
        self.config = config or DPOConfig()
        self.reference: FrozenReference | None = None
        self._reference_digest: str | None = None
        # sft_normalize token: global pairs / global chosen tokens of the batches being
        # prepared (a step's, an evaluation's); None: this micro-batch's own ratio.
        self._pairs_per_chosen_token: torch.Tensor | None = None

    @property
    def needs_reference(self) -> bool:
        return self.config.loss_type != "simpo"

    # -- around the loop -----------------------------------------------------------------
    def bind(self, modules) -> None:
        """The initial weights become the frozen reference (SimPO has none)."""
        if self.needs_reference:
            self.reference = FrozenReference(modules)
            self._reference_digest = self.reference.digest

    def prepare(self, micro_batches, run_forward):
        """Live reference: one swap and one forward-only pass over the step's micro-batches.
        Batches that carry precomputed log-probs (or SimPO's) need nothing."""
        if self.config.sft_weight and self.config.sft_normalize == "token":
            self._pairs_per_chosen_token = _pairs_per_chosen_token(micro_batches)
        if not self.needs_reference or all(b.reference_logps is not None for b in micro_batches):
            return micro_batches
        if self.reference is None or not self.reference.weights:
            raise ValueError("preference batches without reference_logps and no reference "
                             "weights held: precompute them (training.dpo.reference) or bind "
                             "the objective to the model")
        with self.reference.swapped_in():
            outputs = run_forward(micro_batches, self.logps_step)
        # Only the last pipeline stage computes losses, so only it receives them.
        for batch, out in zip(micro_batches, outputs):
            batch.reference_logps = out["logps"]
        return micro_batches

    def logps_step(self, model, batch: PreferenceBatch):
        """Forward step of a reference pass: {"logps": [b, 2]} per micro-batch."""
        self.check_model(model, batch.chosen)
        return (lm_output(model, batch.stacked()),
                lambda per_token: {"logps": answer_logps(batch, per_token)[0]})

    def state_dict(self) -> dict:
        return {"name": self.name, "reference_digest": self._reference_digest}

    def check_resumed(self, state: dict, where: str, same_layout: bool) -> None:
        saved = state.get("reference_digest")
        if same_layout and saved and self._reference_digest and saved != self._reference_digest:
            from apt.trainops.checkpoints import CheckpointError
            raise CheckpointError(f"{where}: the reference weights rebuilt for this run differ "
                                  f"from the ones it was trained against (training.init_from "
                                  f"or the seed changed?): resuming would change the loss")

    # -- training ----------------------------------------------------------------------
    def loss_units(self, batch: PreferenceBatch) -> torch.Tensor:
        return torch.tensor(float(batch.rows), device=batch.chosen.tokens.device)

    def forward_step(self, model, batch: PreferenceBatch):
        self.check_model(model, batch.chosen)
        return lm_output(model, batch.stacked()), partial(self._loss, batch)

    def pair_losses(self, logps: torch.Tensor, lengths: torch.Tensor, reference):
        """(loss per pair, chosen reward, rejected reward), float64, each [b]."""
        c = self.config
        beta, eps = c.beta, c.label_smoothing
        if c.loss_type == "simpo":
            rewards = beta * logps / lengths.clamp(min=1)
            logits = rewards[:, 0] - rewards[:, 1] - c.gamma
            losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        else:
            if reference is None:
                raise ValueError("a preference batch reached the loss without reference_logps")
            ratios = logps - reference.to(logps)
            rewards = beta * ratios
            margin = rewards[:, 0] - rewards[:, 1]
            if c.loss_type == "sigmoid":
                losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
            elif c.loss_type == "robust":
                losses = ((-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin))
                          / (1 - 2 * eps))
            elif c.loss_type == "hinge":
                losses = torch.relu(1 - margin)
            elif c.loss_type == "ipo":
                per_token = ratios / lengths.clamp(min=1)
                losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
            else:
                raise ValueError(f"unknown training.dpo.loss_type {c.loss_type!r}")
        if c.sft_weight and c.sft_normalize == "pair":
            losses = losses + c.sft_weight * (-logps[:, 0] / lengths[:, 0].clamp(min=1))
        return losses, rewards[:, 0], rewards[:, 1]

    def token_sft_loss(self, logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """sft_normalize token: this micro-batch's share of the global batch's summed loss
        (module docstring); 0 otherwise."""
        c = self.config
        if not (c.sft_weight and c.sft_normalize == "token"):
            return logps.new_zeros(())
        scale = self._pairs_per_chosen_token
        if scale is None:   # not prepared (a direct call): this micro-batch is the batch
            scale = logps.new_tensor(float(len(logps))) / lengths[:, 0].sum().clamp(min=1)
        return c.sft_weight * scale.to(logps) * (-logps[:, 0]).sum()

    def _pair_stats(self, batch: PreferenceBatch, per_token: torch.Tensor) -> dict:
        logps, lengths = answer_logps(batch, per_token)
        losses, chosen, rejected = self.pair_losses(logps, lengths, batch.reference_logps)
        loss = losses.sum() + self.token_sft_loss(logps, lengths)
        return {"loss": loss, "rewards/chosen": chosen.sum(),
                "rewards/rejected": rejected.sum(), "rewards/margins": (chosen - rejected).sum(),
                "rewards/accuracies": (chosen > rejected).to(torch.float64).sum(),
                "logps/chosen": logps[:, 0].sum(), "logps/rejected": logps[:, 1].sum()}

    def _loss(self, batch: PreferenceBatch, per_token: torch.Tensor):
        stats = self._pair_stats(batch, per_token)
        loss = stats["loss"].to(per_token.dtype)
        return loss, {k: v.detach() for k, v in stats.items()}

    # -- evaluation --------------------------------------------------------------------
    def eval_forward_step(self, model, batch: PreferenceBatch):
        self.check_model(model, batch.chosen)
        return lm_output(model, batch.stacked()), partial(self._eval_stats, batch)

    def _eval_stats(self, batch: PreferenceBatch, per_token: torch.Tensor) -> dict:
        stats = self._pair_stats(batch, per_token)
        stats["pairs"] = torch.tensor(float(batch.rows), dtype=torch.float64,
                                      device=per_token.device)
        return {k: v.detach().to(torch.float64) for k, v in stats.items()}

    def eval_metrics(self, sums: dict, wanted=()) -> dict:
        pairs = max(sums["pairs"], 1.0)
        out = {name: sums[name] / pairs for name in PAIR_STATS}
        out["pairs"] = int(sums["pairs"])
        return out


def _pairs_per_chosen_token(micro_batches) -> torch.Tensor:
    """Pairs / chosen-answer tokens over ``micro_batches`` and every data-parallel rank
    (collective over the data-parallel group, like the step itself)."""
    device = micro_batches[0].chosen.loss_mask.device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in micro_batches:
        counts[0] += batch.rows
        counts[1] += batch.chosen.loss_mask.to(torch.float64).sum()
    from megatron.core import parallel_state as ps
    if (dist.is_initialized() and ps.model_parallel_is_initialized()
            and ps.get_data_parallel_world_size() > 1):
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
    return counts[0] / counts[1].clamp(min=1.0)
