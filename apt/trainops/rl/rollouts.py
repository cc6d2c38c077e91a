"""Rollouts: the step's micro-batches of a policy-gradient trainer, sampled from the policy.

``RolloutSource`` is the iterator the engine draws its micro-batches from (the loop stays the
one loop): when a step needs batches and none are buffered, it takes this data-parallel rank's
prompts for the step, samples ``num_generations`` completions of each with the policy on this
layout (sampling.py), scores them with the rewards, turns rewards into group-relative
advantages, and cuts the rows into the step's ``grad_accum`` micro-batches. With
``num_iterations`` > 1 the same rollouts serve that many optimizer steps; their old-policy
log-probabilities are computed once, right after sampling (a forward-only pass on this layout),
as are the frozen reference's when beta > 0 (its weights swapped in, objectives/reference.py).

A prompt's group stays on one data-parallel rank, so group statistics are local; ``batch``
scaling divides by the standard deviation of the whole global batch (one all-reduce).

Rewards are computed once per model-parallel group (on the rank that samples) and shared, so
a slow or flaky reward cannot give TP/PP ranks different advantages.

Dynamic sampling (DAPO, ``dynamic_sampling``): a group whose rewards are all equal has zero
advantage, so it only dilutes the batch. A round draws prompt batches until the batch can be
filled with groups that differ, at most ``dynamic_sampling_max_draws`` of them (every
data-parallel rank draws as many, one all-reduce per draw decides, so the prompt cursor stays
the same on every rank); past the cap the all-equal groups fill the rest, first drawn first.
The number of prompt batches drawn is part of the checkpoint (the prompt cursor).

Seeds: completion g of prompt p in generation round r draws from its own generator seeded by
(training.seed, r, p, g) (and the draw, for a round's extra prompt batches): the same tokens on
every layout, and again after a resume.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from apt.trainops.data.datasets.batches import RolloutBatch
from apt.trainops.distributed.engines.forward_only import forward_only
from .sampling import SamplingParams, RankRoles, sample

log = logging.getLogger("apt.rl")


def completion_seed(seed: int, round_: int, prompt: int, generation: int, draw: int = 0) -> int:
    mixed = ((seed * 1_000_003 + round_) * 1_000_003 + prompt) * 4099 + generation
    if draw:   # a round's extra prompt batch (dynamic sampling); draw 0 keeps the old seeds
        mixed = mixed * 8191 + draw
    return mixed % (2 ** 63 - 1)


def varied_groups(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """[groups] bool: the groups of ``rewards`` [n] whose rewards are not all equal (the same
    test as the zero-std flag of ``group_advantages``)."""
    grouped = rewards.view(-1, group)
    std = grouped.std(1) if group > 1 else torch.zeros(grouped.shape[0], dtype=rewards.dtype)
    return ~torch.isclose(std, torch.zeros_like(std))


def fill_batch(drawn: list[torch.Tensor], wanted: int) -> list[tuple[int, int]]:
    """The (draw, group) pairs a round trains on, ``wanted`` of them, from each draw's
    varied-groups flags: the groups that differ first (in drawing order), then the all-equal
    ones (in drawing order) when too few differ."""
    varied = [(d, k) for d, flags in enumerate(drawn) for k, v in enumerate(flags.tolist()) if v]
    equal = [(d, k) for d, flags in enumerate(drawn) for k, v in enumerate(flags.tolist())
             if not v]
    return sorted((varied + equal)[:wanted])


def group_advantages(rewards: torch.Tensor, group: int, scale: str, dp_group=None,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, zero-std flag) per row of ``rewards`` [n] float64 (rows of a group are
    consecutive): reward minus its group's mean, divided by the group's std (``group``), the
    global batch's std (``batch``, all data-parallel ranks), or nothing (``none``)."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True) if group > 1 else torch.zeros_like(mean)
    zero_std = torch.isclose(std, torch.zeros_like(std)).expand_as(grouped).reshape(-1)
    centred = (grouped - mean).reshape(-1)
    if scale == "group":
        return centred / (std.expand_as(grouped).reshape(-1) + eps), zero_std
    if scale == "batch":
        sums = torch.stack([rewards.sum(), (rewards ** 2).sum(),
                            torch.tensor(float(rewards.numel()), dtype=rewards.dtype)])
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(sums, group=dp_group)
        total, squares, n = sums.tolist()
        variance = max(squares - total * total / n, 0.0) / max(n - 1, 1.0)
        return centred / (variance ** 0.5 + eps), zero_std
    return centred, zero_std


class RolloutSource:
    """Iterator of the step's RolloutBatch micro-batches (see the module docstring)."""

    def __init__(self, prompt_batches, chunks, objective, rewards, tokenizer, config, plan,
                 device, start_step: int, sync_group=None, prompt_draws: int | None = None):
        self.prompt_batches, self.chunks = prompt_batches, list(chunks)
        self.objective, self.rewards, self.tokenizer = objective, rewards, tokenizer
        self.grpo, self.seed = config.training.grpo, config.training.seed
        self.seq_length, self.plan, self.device = config.data.seq_length, plan, device
        self.sync_group = sync_group
        self.step = start_step
        self.buffer: list[RolloutBatch] | None = None   # the rollouts of the current round
        self.queue: list[RolloutBatch] = []
        self.generation_s = 0.0
        self.params = sampling_params(self.grpo, tokenizer, self.seq_length)
        # Prompt batches drawn so far (the prompt cursor): one per round without dynamic
        # sampling; a checkpoint records it.
        rounds = -(-start_step // self.grpo.num_iterations)
        self.prompt_draws = rounds if prompt_draws is None else prompt_draws
        # What the current round's dynamic sampling did (logged with every step of the round).
        self.round_stats: dict = {}

    # -- the engine's batch iterator ------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> RolloutBatch:
        if not self.queue:
            if self.step % self.grpo.num_iterations == 0 or self.buffer is None:
                self.buffer = self.generate(self.step // self.grpo.num_iterations)
            self.queue = list(self.buffer)
            self.step += 1
        return self.queue.pop(0)

    def take_wait(self) -> float:
        return self.prompt_batches.take_wait()

    def take_sample_digest(self) -> torch.Tensor:
        return self.prompt_batches.take_sample_digest()

    def take_extras(self) -> dict:
        """Seconds spent sampling (and scoring) since the last call: the loop logs the time
        split between generation and training."""
        spent, self.generation_s = self.generation_s, 0.0
        return {**self.round_stats, "time/generation_s": spent}

    # -- one generation round ------------------------------------------------------------
    def generate(self, round_: int) -> list[RolloutBatch]:
        started = time.perf_counter()
        g = self.grpo.num_generations
        draws = []      # per prompt batch drawn: (prompts, completions, scores)
        wanted = None   # groups per round on this rank
        max_draws = self.grpo.dynamic_sampling_max_draws if self.grpo.dynamic_sampling else 1
        while True:
            prompts = next(self.prompt_batches)
            self.prompt_draws += 1
            wanted = prompts.rows if wanted is None else wanted
            rows = [(i, k) for i in range(prompts.rows) for k in range(g)]
            seeds = [completion_seed(self.seed, round_, int(prompts.sample_id[i]), k,
                                     len(draws)) for i, k in rows]
            completions = sample(self.chunks, [prompts.prompts[i] for i, _ in rows],
                                 self.params, seeds, sync_group=self.sync_group)
            scores = self.score([prompts.texts[i] for i, _ in rows], completions.tokens,
                                [prompts.records[i] for i, _ in rows])
            draws.append((prompts, completions, scores))
            varied = sum(int(varied_groups(d[2][:, 0], g).sum()) for d in draws)
            if len(draws) >= max_draws or not _any_rank(varied < wanted, self.device):
                break
        flags = [varied_groups(d[2][:, 0], g) for d in draws]
        chosen = fill_batch(flags, wanted)
        sampled = sum(len(f) for f in flags)
        equal = sum(int((~f).sum()) for f in flags)
        kept_equal = sum(1 for d, k in chosen if not bool(flags[d][k]))
        # Global counts (every data-parallel rank), so the logged values are the batch's.
        all_rewards = torch.cat([d[2][:, 0] for d in draws])
        counts = _dp_sum([len(draws), sampled, equal, equal - kept_equal, kept_equal,
                          float(all_rewards.sum()), all_rewards.numel()], self.device)
        self.round_stats = {
            "sampling/draws": counts[0] / max(_dp_size(), 1),
            "sampling/groups_sampled": int(counts[1]),
            "sampling/groups_all_equal": counts[2] / max(counts[1], 1),
            "sampling/groups_dropped": int(counts[3]),
            "sampling/groups_all_equal_kept": int(counts[4]),
            # every sampled completion's reward (``reward`` is the trained batch's: with
            # dynamic sampling it leaves out the groups dropped)
            "sampling/reward": counts[5] / max(counts[6], 1)}
        rows = [(d, k * g + j) for d, k in chosen for j in range(g)]
        scores = torch.stack([draws[d][2][r] for d, r in rows])
        # every draw's failure count (on its first row, which may have been dropped): on the
        # batch's first row, so the metric counts every sample scored
        scores[:, 1] = 0.0
        scores[0, 1] = float(sum(d[2][:, 1].sum() for d in draws))
        advantages, zero_std = group_advantages(
            scores[:, 0], g, self.grpo.scale_rewards,
            _dp_group() if self.grpo.scale_rewards == "batch" else None)
        batch = self.assemble(draws, rows, scores, advantages, zero_std)
        micro = batch.rows // self.plan.grad_accum
        micro_batches = [batch.index(slice(j * micro, (j + 1) * micro))
                         for j in range(self.plan.grad_accum)]
        self.fill_policy_logps(micro_batches)
        self.generation_s += time.perf_counter() - started
        return micro_batches

    def score(self, texts, completion_tokens, records) -> torch.Tensor:
        """[rows, 2 + R] float64: total reward, failures, then each reward; computed by the
        sampling rank of the model-parallel group and shared with the others."""
        roles = RankRoles()
        n = len(self.rewards.rewards)
        out = torch.zeros(len(texts), 2 + n, dtype=torch.float64, device=self.device)
        if roles.samples:
            completions = [self.tokenizer.decode(t) for t in completion_tokens]
            scores = self.rewards.score(texts, completions, records)
            out[:, 0] = torch.tensor(scores.total, dtype=torch.float64)
            for k, reward in enumerate(self.rewards.rewards):
                out[:, 2 + k] = torch.tensor(scores.per_reward[reward.label],
                                             dtype=torch.float64)
            if len(texts):
                # the round's failure count, on its first row (the metric sums rows)
                out[0, 1] = float(sum(scores.failures.values()))
        return roles.share(out)

    def assemble(self, draws, rows, scores, advantages, zero_std) -> RolloutBatch:
        """Rows prompt + completion + padding of data.seq_length + 1 tokens; the completion's
        tokens are labels at positions len(prompt) - 1 onwards. ``rows``: (draw, row of that
        draw's completions), a prompt's row being prompt index x num_generations + k."""
        width, n, g = self.seq_length + 1, len(rows), self.grpo.num_generations
        full = torch.full((n, width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(n, width - 1)
        sampler = torch.zeros(n, width - 1)
        stopped, sample_ids = [], []
        for r, (d, row) in enumerate(rows):
            prompts, completions, _ = draws[d]
            prompt, new = prompts.prompts[row // g], completions.tokens[row]
            start, end = len(prompt), len(prompt) + len(new)
            full[r, :start] = prompt
            full[r, start:end] = torch.tensor(new, dtype=torch.long)
            mask[r, start - 1:end - 1] = 1.0
            sampler[r, start - 1:end - 1] = torch.tensor(completions.logps[row])
            stopped.append(completions.stopped[row])
            sample_ids.append(int(prompts.sample_id[row // g]))
        return RolloutBatch(
            tokens=full[:, :-1].contiguous(), labels=full[:, 1:].contiguous(), loss_mask=mask,
            sampler_logps=sampler, advantages=advantages.float(),
            rewards=scores[:, 0].float(), reward_parts=scores[:, 2:].float(),
            reward_failures=scores[:, 1].float(), zero_std=zero_std.float(),
            stopped=torch.tensor(stopped, dtype=torch.float32),
            sample_id=torch.tensor(sample_ids),
        ).to(self.device)

    def fill_policy_logps(self, micro_batches) -> None:
        """Old-policy log-probs (num_iterations > 1) and the reference's (beta > 0), each from
        one forward-only pass over the round's micro-batches on this layout. Only the last
        pipeline stage computes losses, so only it receives them."""
        run = lambda: forward_only(self.chunks, micro_batches, self.objective.logps_step)  # noqa
        if self.grpo.num_iterations > 1:
            for batch, out in zip(micro_batches, run()):
                batch.old_logps = out["logps"]
        reference = self.objective.reference
        if reference is not None:
            with reference.swapped_in():
                for batch, out in zip(micro_batches, run()):
                    batch.ref_logps = out["logps"]

    # -- checkpoints: the round's rollouts, when a step in its middle saves --------------
    def state(self) -> dict:
        """What a checkpoint after ``self.step`` steps must hold to continue bit-identically:
        the prompt cursor (prompt batches drawn), and the current round's rollouts when more
        steps will train on them."""
        state = {"prompt_draws": self.prompt_draws}
        if self.buffer is None or self.step % self.grpo.num_iterations == 0:
            return state
        return {**state, "step": self.step, "round_stats": self.round_stats,
                "micro_batches": [b.to("cpu").to_dict() for b in self.buffer]}

    def load_state(self, state: dict) -> None:
        self.buffer = [RolloutBatch.from_dict(b).to(self.device) for b in state["micro_batches"]]
        self.round_stats = dict(state.get("round_stats", {}))


def sampling_params(grpo, tokenizer, seq_length: int, greedy: bool = False) -> SamplingParams:
    from apt.trainops.data.tokenizers.chat_template import stop_ids
    stops = tuple(tuple(int(t) for t in tokenizer.encode(s)) for s in grpo.stop)
    return SamplingParams(max_new_tokens=grpo.max_new_tokens, eod_id=tokenizer.eod_id,
                          stop_ids=stop_ids(tokenizer),
                          valid_vocab=tokenizer.vocab_size, temperature=grpo.temperature,
                          top_p=grpo.top_p, top_k=grpo.top_k, greedy=greedy,
                          kv_cache=grpo.kv_cache, stop_sequences=stops, max_length=seq_length)


def _dp_group():
    from megatron.core import parallel_state
    return parallel_state.get_data_parallel_group()


def _dp_size() -> int:
    return dist.get_world_size(_dp_group()) if dist.is_initialized() else 1


def _dp_sum(values: list, device) -> list[float]:
    """``values`` summed over the data-parallel ranks (one all-reduce)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _dp_size() > 1:
        dist.all_reduce(tensor, group=_dp_group())
    return tensor.tolist()


def _any_rank(flag: bool, device) -> bool:
    """True on every data-parallel rank when ``flag`` is true on one: ranks draw alike."""
    return _dp_sum([float(flag)], device)[0] > 0
