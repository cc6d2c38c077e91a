"""The objectives' settings, ``training.dpo`` and ``training.grpo``, and the rules that pair an
objective with its corpus."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .rules import rule

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


@dataclass(frozen=True)
class DPOConfig:
    """Preference alignment (the ClaudeTrainer, apt/trainops/objectives/preference.py)."""
    # sigmoid: DPO; ipo: squared loss on per-token averaged log-ratios; hinge: SLiC; robust:
    # label-noise-robust DPO; simpo: reference-free, length-normalised, with margin `gamma`.
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = "sigmoid"
    # Strength of the KL constraint to the reference (IPO: its tau; SimPO: its reward scale).
    beta: float = rule(0.1, gt=0)
    # Probability that a pair's preference label is flipped (sigmoid: cDPO, robust, simpo).
    label_smoothing: float = rule(0.0, ge=0, lt=0.5)
    # SimPO's target reward margin (in reward units).
    gamma: float = rule(0.5, ge=0)
    # RPO: weight of an SFT term, the chosen answer's per-token negative log-likelihood.
    sft_weight: float = rule(0.0, ge=0)
    # How that NLL is averaged. pair: per pair (its chosen answer's token mean), then over the
    # pairs; token: one token mean over all chosen tokens of the global batch (TRL's
    # rpo_alpha and loss_type [sigmoid, sft]): long answers weigh more.
    sft_normalize: Literal["pair", "token"] = "pair"
    # Where the reference log-probs come from: live = the frozen initial weights, held in host
    # memory and swapped into the same model for a forward pass each step; precomputed = that
    # pass once over the whole dataset before training, stored with the data (no weights held
    # while training). SimPO needs neither.
    reference: Literal["live", "precomputed"] = "live"


@dataclass(frozen=True)
class GRPOConfig:
    """Reinforcement learning with verifiable rewards (the O1Trainer,
    apt/trainops/objectives/grpo.py, apt/trainops/rl/)."""
    # Completions sampled per prompt (a group); training.batch_size counts completions, so it
    # must be a multiple of num_generations x data-parallel size.
    num_generations: int = rule(8, gt=1)
    # Optimizer steps on each batch of rollouts (> 1: PPO-style reuse with the old policy's
    # log-probs and the clipped ratio).
    num_iterations: int = rule(1, gt=0)
    # Sampling: temperature, nucleus top_p (1 = off), top_k (0 = off), new-token limit, and
    # stop strings (the tokenizer's end-of-document token always stops).
    temperature: float = rule(1.0, gt=0)
    top_p: float = rule(1.0, gt=0, le=1)
    top_k: int = rule(0, ge=0)
    max_new_tokens: int = rule(32, gt=0)
    stop: list = rule([])
    # Key-value cache while sampling (off: every new token recomputes the whole prefix; for the
    # generation benchmark).
    kv_cache: bool = True
    # Rewards: [{name, weight, ...options}] summed with their weights; names are built-ins
    # (exact_match, numeric, format, code) or module:function (apt/trainops/rewards).
    rewards: list = rule([{"name": "exact_match", "weight": 1.0}])
    # Advantages: reward minus the group mean, divided by the std of the group, of the whole
    # batch, or not at all (none: Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # KL penalty (k3 estimator) to the frozen initial policy; 0 holds no reference.
    beta: float = rule(0.0, ge=0)
    # Clipped surrogate: ratio within [1 - epsilon, 1 + epsilon_high] (epsilon_high None:
    # epsilon; DAPO's clip-higher raises it).
    epsilon: float = rule(0.2, gt=0, lt=1)
    epsilon_high: Optional[float] = rule(None, gt=0)
    # How per-token losses become the step's loss: grpo = mean over each completion's tokens,
    # then over completions; bnpo = over the tokens of each micro-batch; dr_grpo = sum over
    # tokens / (completions x max_new_tokens); dapo = over every token of the global batch.
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    # Held-out prompts scored (greedy, the rewards) at every evaluation; 0 = all.
    eval_prompts: int = rule(200, ge=0)
    # DAPO's dynamic sampling: a group whose rewards are all equal has zero advantage and
    # teaches nothing, so a round keeps sampling further prompt batches (each batch /
    # num_generations prompts) and fills the batch with groups that differ; after
    # dynamic_sampling_max_draws batches (the first included) the rest of the batch is filled
    # with all-equal groups. Logged per step: sampling/groups_dropped, sampling/draws.
    dynamic_sampling: bool = True
    dynamic_sampling_max_draws: int = rule(4, gt=0)
    # DAPO's overlong filtering: completions cut at max_new_tokens (no end-of-document) are
    # masked out of the loss (their reward still counts in the group's statistics): a cut
    # answer is not a wrong one.
    overlong_filter: bool = False


def objective_checks(cfg):
    """The objective against its corpus. ``cfg`` is the whole profile (schema.profile's
    APTConfig, which imports this module: a section never imports the profile)."""
    objective, corpus = cfg.training.objective, cfg.data.corpus
    if objective == "dpo" and corpus != "preference":
        yield "training.objective", ("'dpo' trains on preference pairs: needs data.corpus "
                                     f"'preference' (got {corpus!r})")
    if corpus == "preference" and objective != "dpo":
        yield "data.corpus", (f"'preference' pairs train with training.objective 'dpo' (got "
                              f"{objective!r})")
    if (objective == "grpo") != (corpus == "prompts"):
        key = "training.objective" if objective == "grpo" else "data.corpus"
        yield key, (f"training.objective 'grpo' and data.corpus 'prompts' go together (got "
                    f"{objective!r} on {corpus!r})")
    if objective == "grpo":
        yield from _grpo_checks(cfg)


def _grpo_checks(cfg):
    g, t, d = cfg.training.grpo, cfg.training, cfg.training.distributed
    groups = g.num_generations * max(1, d.data_parallel or 1)
    if t.batch_size % g.num_generations:
        yield "training.grpo.num_generations", (
            f"{g.num_generations} does not divide training.batch_size={t.batch_size} (the "
            f"batch counts completions: num_generations per prompt)")
    elif d.data_parallel and t.batch_size % groups:
        yield "training.batch_size", (
            f"{t.batch_size} completions cannot be split into whole groups of "
            f"{g.num_generations} over data_parallel={d.data_parallel}")
    prompt = cfg.data.max_prompt_length
    if g.max_new_tokens >= cfg.data.seq_length:
        yield "training.grpo.max_new_tokens", (f"{g.max_new_tokens} leaves no room for a prompt "
                                               f"in data.seq_length={cfg.data.seq_length}")
    elif prompt is not None and prompt + g.max_new_tokens > cfg.data.seq_length:
        yield "data.max_prompt_length", (f"{prompt} + training.grpo.max_new_tokens="
                                         f"{g.max_new_tokens} exceeds data.seq_length="
                                         f"{cfg.data.seq_length}")
    if not isinstance(g.stop, list) or not all(isinstance(s, str) and s for s in g.stop):
        yield "training.grpo.stop", f"{g.stop!r}: expected a list of non-empty strings"
    if not isinstance(g.rewards, list) or not g.rewards:
        yield "training.grpo.rewards", "expected a non-empty list of {name, weight, ...}"
    # Sampling feeds one micro-batch per new token through the pipeline: the interleaved
    # schedule needs PP of them; context parallelism would split a one-token pass.
    if d.virtual_pipeline_stages > 1:
        yield "training.distributed.virtual_pipeline_stages", (
            "GRPO samples through a one-micro-batch pipeline pass: use 1 (no interleaving)")
    if d.context_parallel > 1:
        yield "training.distributed.context_parallel", (
            "GRPO's sampler cannot split a one-token pass over context-parallel ranks: use 1")
