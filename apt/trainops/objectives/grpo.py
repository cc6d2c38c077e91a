"""Group-relative policy optimisation (GRPO and its aggregations: bnpo, Dr. GRPO, DAPO).

A ``RolloutBatch`` holds completions the policy sampled (apt/trainops/rl/rollouts.py made them
and their advantages). Per completion token t of row i, with the trainer's log-probability
``logp`` (temperature-scaled, as the sampler drew), ``old`` the policy's before this batch's
first update (``logp`` detached when num_iterations = 1) and advantage ``A_i``:

    ratio = exp(logp - old)
    l_it  = -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i)
          + beta * (exp(ref - logp) - (ref - logp) - 1)        (k3 KL estimator, beta > 0)

Aggregations (``loss_type``), as a sum over the objective's units (the engine divides by the
global batch's units, so accumulation and data parallelism are exact):
    grpo     units = completions;   sum_i (sum_t l_it) / |o_i|
    bnpo     units = completions;   each micro-batch's token mean, times its rows
    dr_grpo  units = completions x max_new_tokens;  sum_it l_it
    dapo     units = completion tokens;             sum_it l_it

Logged per step: ``reward`` (+ ``reward_std`` and ``rewards/<name>`` per reward,
``reward_failures``), ``frac_reward_zero_std``, ``kl``, ``entropy``, ``clip_ratio/low``,
``clip_ratio/high``, ``clip_ratio/region``, ``completion_length``, ``completion_clipped_ratio``
(completions cut at max_new_tokens) and ``sampler_ratio`` (mean of sampler / trainer token
probability; it stays near 1 unless sampling and training diverge) with ``sampler_logp_diff``
(mean absolute difference of their log-probabilities). The rollouts add what dynamic sampling
did (``sampling/*``, apt/trainops/rl/rollouts.py). With ``overlong_filter`` the completions
cut at max_new_tokens are left out of the loss (``train_mask``), not out of the metrics.
"""
from __future__ import annotations

from functools import partial

import torch

from apt.trainops.data.datasets.batches import RolloutBatch
from .base import Objective
from .reference import FrozenReference

TOKEN_STATS = ("kl", "entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region",
               "sampler_ratio", "sampler_logp_diff")
ROW_STATS = ("reward", "reward_sq", "frac_reward_zero_std", "completion_length",
             "completion_clipped_ratio", "reward_failures")


def logps_from_logits(logits, labels, temperature, valid_vocab, tp_rank, tp_group,
                      tensor_parallel):
    """(log-probability of each label [b, s] float32 with gradients, entropy [b, s] without)
    under softmax(logits / temperature) over the tokenizer's vocabulary, from this TP rank's
    vocabulary shard [b, s, V / TP] (Megatron's cross-entropy all-reduces over TP)."""
    shard = logits.shape[-1]
    start = tp_rank * shard
    logits = logits.float() / temperature
    ids = torch.arange(start, start + shard, device=logits.device)
    padded = ids >= valid_vocab                                # embedding rows no token uses
    if padded.any():
        logits = logits.masked_fill(padded, float("-inf"))
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                      labels.transpose(0, 1).contiguous())
    with torch.no_grad():
        entropy = _vocab_parallel_entropy(logits.detach(), padded, tp_group)
    return -ce.transpose(0, 1), entropy


def _vocab_parallel_entropy(logits, padded, group):
    import torch.distributed as dist
    finite = logits.masked_fill(padded, 0.0)
    top = finite.max(dim=-1, keepdim=True).values
    if dist.get_world_size(group) > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    weights = (finite - top).exp().masked_fill(padded, 0.0)
    parts = torch.stack([weights.sum(-1), (weights * finite).sum(-1)])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(parts, group=group)
    z, weighted = parts
    return z.log() + top.squeeze(-1) - weighted / z


class GRPOObjective(Objective):
    name = "grpo"
    batch_type = RolloutBatch

    def __init__(self, config=None, reward_names=(), valid_vocab: int | None = None,
                 answer_evaluation=None):
        from apt.core.config import GRPOConfig
        self.config = config or GRPOConfig()
        self.reward_names = tuple(reward_names)
        self.valid_vocab = valid_vocab
        # evaluator -> held-out metrics (``evaluate``); the trainer that holds the rewards
        # supplies it, so this module needs neither the sampler nor the rewards
        self.answer_evaluation = answer_evaluation
        self.stat_names = (("loss", "completions", "tokens") + ROW_STATS + TOKEN_STATS
                           + tuple(f"rewards/{n}" for n in self.reward_names))
        self.reference: FrozenReference | None = None

    @property
    def epsilon_high(self) -> float:
        return self.config.epsilon_high or self.config.epsilon

    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0

    def bind(self, modules) -> None:
        """beta > 0: the initial weights become the frozen reference of the KL penalty."""
        if self.config.beta > 0:
            self.reference = FrozenReference(modules)

    def state_dict(self) -> dict:
        return {"name": self.name,
                "reference_digest": self.reference.digest if self.reference else None}

    def check_resumed(self, state: dict, where: str, same_layout: bool) -> None:
        saved = state.get("reference_digest")
        if same_layout and saved and self.reference and saved != self.reference.digest:
            from apt.trainops.checkpoints import CheckpointError
            raise CheckpointError(f"{where}: the KL reference rebuilt for this run differs from "
                                  f"the one it was trained against (training.init_from or the "
                                  f"seed changed?): resuming would change the loss")

    # -- training ----------------------------------------------------------------------
    def train_mask(self, batch: RolloutBatch) -> torch.Tensor:
        """The tokens the loss covers: the completions' (``loss_mask``), less those of the
        completions cut at max_new_tokens under ``overlong_filter`` (DAPO)."""
        if not self.config.overlong_filter:
            return batch.loss_mask
        return batch.loss_mask * batch.stopped.to(batch.loss_mask.dtype)[:, None]

    def loss_units(self, batch: RolloutBatch) -> torch.Tensor:
        rows = torch.tensor(float(batch.rows), device=batch.tokens.device)
        if self.config.loss_type == "dapo":
            return self.train_mask(batch).sum()
        if self.config.loss_type == "dr_grpo":
            return rows * self.config.max_new_tokens
        return rows

    def logps_step(self, model, batch: RolloutBatch):
        """Forward step of a pass without gradients: {"logps": [b, s]} (old policy, reference)."""
        self.check_model(model, batch.as_lm())
        return (model(batch.tokens, None, None),
                lambda logits: {"logps": self._logps(logits, batch.labels)[0].detach()})

    def _logps(self, logits, labels):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        tp = ps.get_tensor_model_parallel_world_size()
        valid = self.valid_vocab or logits.shape[-1] * tp   # unset: every embedding row
        return logps_from_logits(logits, labels, self.config.temperature, valid,
                                 ps.get_tensor_model_parallel_rank(),
                                 ps.get_tensor_model_parallel_group(), tensor_parallel)

    def forward_step(self, model, batch: RolloutBatch):
        self.check_model(model, batch.as_lm())
        return model(batch.tokens, None, None), partial(self._loss, batch)

    def per_token_terms(self, batch: RolloutBatch, logps: torch.Tensor) -> dict:
        """The loss and its diagnostics per label position [b, s] (masked later)."""
        c = self.config
        old = batch.old_logps if batch.old_logps is not None else logps.detach()
        ratio = torch.exp(logps - old)
        advantages = batch.advantages.to(logps.dtype)[:, None]
        clipped = torch.clamp(ratio, 1 - c.epsilon, 1 + self.epsilon_high)
        loss = -torch.min(ratio * advantages, clipped * advantages)
        terms = {"loss": loss}
        if c.beta > 0:
            if batch.ref_logps is None:
                raise ValueError("beta > 0 but the rollout batch has no reference log-probs")
            delta = batch.ref_logps.to(logps.dtype) - logps
            kl = torch.exp(delta) - delta - 1
            terms["loss"] = loss + c.beta * kl
            terms["kl"] = kl.detach()
        else:
            terms["kl"] = torch.zeros_like(loss)
        with torch.no_grad():
            low = (ratio < 1 - c.epsilon) & (advantages < 0)
            high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
            terms.update({"clip_ratio/low": low.float(), "clip_ratio/high": high.float(),
                          "clip_ratio/region": (low | high).float(),
                          "sampler_ratio": torch.exp(batch.sampler_logps - logps.detach()),
                          "sampler_logp_diff": (batch.sampler_logps - logps.detach()).abs()})
        return terms

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss as a sum over the objective's units (module docstring)."""
        masked = per_token * mask
        kind = self.config.loss_type
        if kind == "grpo":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
        if kind == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) * mask.shape[0]
        return masked.sum()

    def _loss(self, batch: RolloutBatch, logits: torch.Tensor):
        logps, entropy = self._logps(logits, batch.labels)
        terms = self.per_token_terms(batch, logps)
        mask = batch.loss_mask.to(logps.dtype)   # the diagnostics cover every completion
        loss = self.aggregate(terms["loss"], self.train_mask(batch).to(logps.dtype))
        f64 = torch.float64

        def token_sum(x):
            return (x.detach().to(f64) * mask.to(f64)).sum()
        stats = {"loss": loss.detach().to(f64),
                 "completions": torch.tensor(float(batch.rows), dtype=f64, device=mask.device),
                 "tokens": mask.to(f64).sum(), "entropy": token_sum(entropy),
                 **{name: token_sum(terms[name]) for name in TOKEN_STATS if name != "entropy"},
                 "reward": batch.rewards.to(f64).sum(),
                 "reward_sq": (batch.rewards.to(f64) ** 2).sum(),
                 "frac_reward_zero_std": batch.zero_std.to(f64).sum(),
                 "completion_length": mask.to(f64).sum(),
                 "completion_clipped_ratio": (1 - batch.stopped.to(f64)).sum(),
                 "reward_failures": batch.reward_failures.to(f64).sum()}
        for k, name in enumerate(self.reward_names):
            stats[f"rewards/{name}"] = batch.reward_parts[:, k].to(f64).sum()
        return loss, stats

    def step_metrics(self, sums: dict, units: float) -> dict:
        rows, tokens = max(sums["completions"], 1.0), max(sums["tokens"], 1.0)
        mean = sums["reward"] / rows
        variance = max(sums["reward_sq"] / rows - mean * mean, 0.0) * rows / max(rows - 1, 1.0)
        out = {"loss": sums["loss"] / max(units, 1.0), "reward": mean,
               "reward_std": variance ** 0.5, "completions": int(sums["completions"]),
               "reward_failures": int(sums["reward_failures"])}
        for name in ("frac_reward_zero_std", "completion_length", "completion_clipped_ratio"):
            out[name] = sums[name] / rows
        for name in TOKEN_STATS:
            out[name] = sums[name] / tokens
        for name in self.reward_names:
            out[f"rewards/{name}"] = sums[f"rewards/{name}"] / rows
        return out

    # -- evaluation: greedy answers to held-out prompts, scored by the rewards ------------
    def evaluate(self, evaluator, max_batches: int | None) -> dict:
        """``reward``, ``rewards/<name>``, ``accuracy``, ``completion_length`` and
        ``prompts`` of greedy answers to the first ``eval_prompts`` held-out prompts
        (``max_batches`` does not apply): the ``answer_evaluation`` the trainer gave this
        objective (apt/trainops/rl/evaluation.py, which samples on the evaluator's layout)."""
        if self.answer_evaluation is None:
            raise ValueError("GRPO is evaluated by greedy answers scored by rewards: build the "
                             "objective with answer_evaluation= (O1Trainer does)")
        return self.answer_evaluation(evaluator)
