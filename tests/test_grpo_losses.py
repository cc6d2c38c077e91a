"""GRPO's pieces in isolation: advantages, the clipped surrogate with KL, the aggregations,
dynamic sampling's choice of groups, overlong filtering, and the sampler's truncation."""
import math

import pytest
import torch

from apt.core.config import GRPOConfig
from apt.trainops.data.datasets.batches import RolloutBatch
from apt.trainops.objectives.grpo import GRPOObjective
from apt.trainops.rl.rollouts import fill_batch, group_advantages, varied_groups
from apt.trainops.rl.sampling import SamplingParams, choose


def test_group_advantages_centre_and_scale():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    adv, zero = group_advantages(rewards, 4, "group")
    std = torch.tensor([1.0, 0, 0, 0]).std().item()           # unbiased, as TRL
    assert adv[:4].tolist() == pytest.approx([0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3)
    assert adv[4:].tolist() == [0.0] * 4                       # all alike: no signal
    assert zero.tolist() == [False] * 4 + [True] * 4
    adv, _ = group_advantages(rewards, 4, "batch")
    assert adv[0].item() == pytest.approx(0.75 / (rewards.std().item() + 1e-4))
    adv, _ = group_advantages(rewards, 4, "none")
    assert adv[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_dynamic_sampling_keeps_groups_that_differ_first():
    rewards = torch.tensor([1.0, 1, 0, 1,  0, 0, 0, 0,  1, 1, 1, 1], dtype=torch.float64)
    assert varied_groups(rewards, 4).tolist() == [True, False, False]
    first = torch.tensor([True, False, False])      # draw 0: one group of three differs
    second = torch.tensor([False, True, True])      # draw 1: two more
    assert fill_batch([first, second], 3) == [(0, 0), (1, 1), (1, 2)]
    # past the cap too few differ: all-equal groups fill the rest, first drawn first
    assert fill_batch([first], 3) == [(0, 0), (0, 1), (0, 2)]
    assert fill_batch([torch.tensor([False, True]), torch.tensor([True, True])], 2) == \
        [(0, 1), (1, 0)]


def test_overlong_filter_masks_cut_completions_out_of_the_loss():
    mask = torch.tensor([[1.0, 1.0, 0], [1.0, 1.0, 1.0]])
    batch = _batch([1.0, 1.0], mask)
    batch.stopped = torch.tensor([1.0, 0.0])        # row 1 hit max_new_tokens
    per_token = torch.ones(2, 3)
    plain = GRPOObjective(GRPOConfig(loss_type="dapo"))
    filtered = GRPOObjective(GRPOConfig(loss_type="dapo", overlong_filter=True))
    assert plain.loss_units(batch).item() == 5 and filtered.loss_units(batch).item() == 2
    assert filtered.aggregate(per_token, filtered.train_mask(batch)).item() == 2.0
    assert plain.aggregate(per_token, plain.train_mask(batch)).item() == 5.0


def _batch(advantages, mask, sampler=None):
    b, s = mask.shape
    zeros = torch.zeros(b)
    return RolloutBatch(tokens=torch.zeros(b, s, dtype=torch.long),
                        labels=torch.zeros(b, s, dtype=torch.long), loss_mask=mask,
                        sampler_logps=torch.zeros(b, s) if sampler is None else sampler,
                        advantages=torch.tensor(advantages), rewards=zeros,
                        reward_parts=zeros[:, None], reward_failures=zeros, zero_std=zeros,
                        stopped=zeros)


def test_clipped_surrogate_and_k3_kl():
    objective = GRPOObjective(GRPOConfig(epsilon=0.2, epsilon_high=0.28, beta=0.1))
    mask = torch.ones(2, 3)
    batch = _batch([1.0, -1.0], mask)
    logps = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])).requires_grad_()
    # old probabilities: row 0 token 0 ratio 1.5 (> 1.28, A > 0: clipped high), token 1 ratio
    # 1.1 (inside); row 1 token 0 ratio 0.5 (< 0.8, A < 0: clipped low), token 2 ratio 1.
    ratios = torch.tensor([[1.5, 1.1, 1.0], [0.5, 1.0, 1.0]])
    batch.old_logps = (logps - ratios.log()).detach()
    batch.ref_logps = logps.detach().clone()
    batch.ref_logps[0, 2] = logps[0, 2].item() + math.log(2.0)   # reference twice as likely
    terms = objective.per_token_terms(batch, logps)
    assert terms["loss"][0, 0].item() == pytest.approx(-1.28)       # min(1.5, 1.28) * A
    assert terms["loss"][0, 1].item() == pytest.approx(-1.1)
    assert terms["loss"][1, 0].item() == pytest.approx(0.8)         # -min(-0.5, -0.8)
    assert terms["kl"][0, 2].item() == pytest.approx(2.0 - math.log(2.0) - 1)   # k3
    assert terms["loss"][0, 2].item() == pytest.approx(-1.0 + 0.1 * (1 - math.log(2.0)))
    assert terms["clip_ratio/high"].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert terms["clip_ratio/low"].tolist() == [[0, 0, 0], [1, 0, 0]]
    terms["loss"].sum().backward()
    assert logps.grad[0, 0] == 0 and logps.grad[1, 0] == 0        # clipped: no gradient
    assert logps.grad[0, 1] != 0


def test_without_kl_and_with_one_iteration_nothing_clips():
    objective = GRPOObjective(GRPOConfig(beta=0.0))
    assert objective.reference is None
    objective.bind([torch.nn.Linear(2, 2)])
    assert objective.reference is None                  # beta 0 holds no reference
    batch = _batch([2.0, -1.0], torch.ones(2, 4))
    terms = objective.per_token_terms(batch, torch.randn(2, 4))
    assert terms["clip_ratio/region"].sum() == 0 and terms["kl"].abs().sum() == 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_aggregations(loss_type):
    objective = GRPOObjective(GRPOConfig(loss_type=loss_type, max_new_tokens=5))
    mask = torch.tensor([[1.0, 1.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0, 0]])
    per_token = torch.tensor([[1.0, 3.0, 9, 9, 9], [1.0, 1.0, 1.0, 5.0, 9]])
    got = objective.aggregate(per_token, mask).item()
    units = objective.loss_units(_batch([0.0, 0.0], mask)).item()
    want = {"grpo": ((2.0 + 2.0), 2), "bnpo": (12.0 / 6 * 2, 2),
            "dr_grpo": (12.0, 2 * 5), "dapo": (12.0, 6)}[loss_type]
    assert (got, units) == pytest.approx(want)


def test_sampler_truncation_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]) + 1e-12)
    params = SamplingParams(max_new_tokens=1, eod_id=0, valid_vocab=4, top_p=0.7)
    seen = set()
    for seed in range(200):
        token, logp = choose(logits.clone(), params, [torch.Generator().manual_seed(seed)])
        seen.add(int(token))
        assert logp.item() == pytest.approx(math.log([0.5, 0.3, 0.15, 0.05][int(token)] + 1e-12),
                                            abs=1e-4)   # before truncation: what the trainer sees
    assert seen == {0, 1}                     # top-p 0.7 keeps the two tokens covering it
    top_k = SamplingParams(max_new_tokens=1, eod_id=0, valid_vocab=4, top_k=3)
    assert {int(choose(logits.clone(), top_k, [torch.Generator().manual_seed(s)])[0])
            for s in range(300)} == {0, 1, 2}
    greedy = SamplingParams(max_new_tokens=1, eod_id=0, valid_vocab=4, greedy=True)
    assert int(choose(logits.clone(), greedy, [None])[0]) == 0
