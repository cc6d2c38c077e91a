"""The held-out evaluation of a policy trained on rewards: greedy answers, scored.

GRPO's objective evaluates through the Evaluator like every objective
(``GRPOObjective.evaluate``); what it measures is this: the policy answers the first
``training.grpo.eval_prompts`` held-out prompts greedily on the evaluator's layout (sampling.py;
data-parallel ranks answer a share each), the rewards score the answers, and every rank gets
the same means: ``reward``, ``rewards/<name>``, ``accuracy`` (the share whose first reward
scored 1), ``completion_length`` and ``prompts``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .rollouts import sampling_params
from .sampling import RankRoles, sample


def greedy_answers(chunks, prompts: list, grpo, tokenizer, seq_length: int,
                   sync_group=None) -> list[list[int]]:
    """Greedy completions (token ids) of ``prompts`` on this layout; collective over the
    model-parallel group (and ``sync_group``: ZeRO-3's data-parallel group)."""
    params = sampling_params(grpo, tokenizer, seq_length, greedy=True)
    return sample(chunks, prompts, params, [0] * len(prompts), sync_group=sync_group).tokens


class GreedyAnswerEvaluation:
    """``GreedyAnswerEvaluation(rewards, grpo, seq_length)(evaluator)``: the metrics above, from
    the evaluator's ``chunks``, held-out ``dataloader.dataset`` (a PromptDataset),
    ``tokenizer`` and ``lockstep_group``."""

    def __init__(self, rewards, grpo, seq_length: int):
        self.rewards, self.grpo, self.seq_length = rewards, grpo, seq_length

    def __call__(self, evaluator) -> dict:
        from megatron.core import parallel_state
        dataset = getattr(evaluator.dataloader, "dataset", None)
        if dataset is None:
            return {}
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        count = min(len(dataset), self.grpo.eval_prompts or len(dataset))
        mine = list(range(dp_rank, count, dp_size))
        batch = dataset.get_batch(mine)
        tokenizer = evaluator.tokenizer
        answers = greedy_answers(evaluator.chunks, batch.prompts, self.grpo, tokenizer,
                                 self.seq_length, sync_group=evaluator.lockstep_group)
        labels = [r.label for r in self.rewards.rewards]
        roles = RankRoles()
        device = next(evaluator.chunks[0].parameters()).device
        sums = torch.zeros(4 + len(labels), dtype=torch.float64, device=device)
        if roles.samples and mine:
            texts = [tokenizer.decode(t) for t in answers]
            scores = self.rewards.score(batch.texts, texts, batch.records)
            sums[0] = len(mine)
            sums[1] = sum(scores.total)
            sums[2] = sum(1.0 for v in scores.per_reward[labels[0]] if v >= 1.0)
            sums[3] = sum(len(t) for t in answers)
            for k, label in enumerate(labels):
                sums[4 + k] = sum(scores.per_reward[label])
        sums = roles.share(sums)
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        n = max(float(sums[0]), 1.0)
        out = {"reward": float(sums[1]) / n, "accuracy": float(sums[2]) / n,
               "completion_length": float(sums[3]) / n, "prompts": int(sums[0])}
        out.update({f"rewards/{label}": float(sums[4 + k]) / n
                    for k, label in enumerate(labels)})
        return out
