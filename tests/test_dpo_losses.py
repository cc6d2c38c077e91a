"""The DPO family's per-pair losses against their published formulas, computed independently
(plain Python floats), and the metrics' definitions. No model: see test_dpo.py for training."""
import math
import random

import pytest
import torch

from apt.core.config import ConfigError, DPOConfig, load_profile
from apt.trainops.objectives import PreferenceObjective


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _expected(loss_type, beta, eps, gamma, sft, pc, pr, rc, rr, nc, nr):
    """One pair's loss from the papers' formulas (DPO, cDPO/robust, SLiC hinge, IPO, SimPO,
    RPO), written out scalar by scalar."""
    if loss_type == "simpo":
        z = beta * pc / nc - beta * pr / nr - gamma
        loss = -(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z))
    else:
        z = beta * ((pc - rc) - (pr - rr))
        if loss_type == "sigmoid":
            loss = -(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z))
        elif loss_type == "robust":
            loss = (-(1 - eps) * math.log(_sig(z)) + eps * math.log(_sig(-z))) / (1 - 2 * eps)
        elif loss_type == "hinge":
            loss = max(0.0, 1 - z)
        else:   # ipo: per-token averaged log-ratios, target 1 / (2 beta)
            loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    return loss + sft * (-pc / nc)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("eps,sft", [(0.0, 0.0), (0.2, 0.5)])
def test_pair_losses_follow_the_formulas(loss_type, eps, sft):
    rng = random.Random(hash((loss_type, eps)) % 1000)
    beta, gamma = 0.3, 0.7
    objective = PreferenceObjective(DPOConfig(loss_type=loss_type, beta=beta,
                                              label_smoothing=eps, gamma=gamma, sft_weight=sft))
    pairs = [[rng.uniform(-40, -2) for _ in range(4)] + [rng.randint(1, 9), rng.randint(1, 9)]
             for _ in range(6)]
    logps = torch.tensor([[p[0], p[1]] for p in pairs], dtype=torch.float64)
    reference = torch.tensor([[p[2], p[3]] for p in pairs], dtype=torch.float64)
    lengths = torch.tensor([[p[4], p[5]] for p in pairs], dtype=torch.float64)
    losses, chosen, rejected = objective.pair_losses(logps, lengths, reference)
    for i, (pc, pr, rc, rr, nc, nr) in enumerate(pairs):
        want = _expected(loss_type, beta, eps, gamma, sft, pc, pr, rc, rr, nc, nr)
        assert losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        if loss_type == "simpo":
            assert chosen[i].item() == pytest.approx(beta * pc / nc)
        else:
            assert chosen[i].item() == pytest.approx(beta * (pc - rc))
            assert rejected[i].item() == pytest.approx(beta * (pr - rr))


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    objective = PreferenceObjective(DPOConfig())
    logps = torch.tensor([[-12.5, -9.25], [-3.0, -30.0]], dtype=torch.float64)
    losses, chosen, rejected = objective.pair_losses(logps, torch.ones_like(logps), logps.clone())
    assert torch.all(losses == math.log(2)) and not chosen.any() and not rejected.any()


def test_accuracy_is_strict_and_metrics_are_means_over_pairs():
    """Through the loss function itself: per-token losses of a stacked batch in, sums out."""
    from apt.trainops.data.datasets.batches import LMBatch, PreferenceBatch
    objective = PreferenceObjective(DPOConfig(beta=1.0))
    side = lambda: LMBatch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                           torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]))
    batch = PreferenceBatch(side(), side(), reference_logps=torch.zeros(2, 2, dtype=torch.float64))
    # answer log-probs: pair 0 chosen -1 > rejected -2; pair 1 a tie at -5 (not counted right).
    # Position 0 is outside the loss mask: its value must not count.
    per_token = torch.tensor([[9.0, 0.5, 0.5], [9.0, 2.5, 2.5],     # chosen rows
                              [9.0, 1.0, 1.0], [9.0, 2.5, 2.5]])    # rejected rows
    loss, stats = objective._loss(batch, per_token)
    metrics = objective.step_metrics({k: float(v) for k, v in stats.items()}, 2.0)
    assert metrics["rewards/accuracies"] == 0.5
    assert metrics["rewards/margins"] == pytest.approx(0.5)
    assert metrics["logps/chosen"] == pytest.approx(-3.0)
    assert metrics["logps/rejected"] == pytest.approx(-3.5)
    want = (-math.log(_sig(1.0)) - math.log(0.5))
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_profile_checks_name_the_key():
    with pytest.raises(ConfigError, match="training.dpo.label_smoothing"):
        load_profile("tiny", ["training.dpo.label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="training.dpo.loss_type"):
        load_profile("tiny", ["training.dpo.loss_type=kto"])
    with pytest.raises(ConfigError, match="training.objective.*preference"):
        load_profile("tiny", ["training.objective=dpo"])


def _trl_sigmoid_sft(logits, labels, masks, reference, beta, weight):
    """TRL's DPOTrainer with loss_type=["sigmoid", "sft"], loss_weights=[1, weight] (the same
    as rpo_alpha=weight), written out as its code computes it: answer log-probs summed over
    the labelled tokens, the sigmoid loss per pair, and one F.cross_entropy over the chosen
    rows' labelled tokens (mean reduction: a token mean over the batch), added to every pair
    before the mean over pairs."""
    pairs = labels.shape[0] // 2
    logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    answer = (logp * masks).sum(-1)
    chosen, rejected = answer[:pairs], answer[pairs:]
    z = beta * ((chosen - reference[:, 0]) - (rejected - reference[:, 1]))
    sigmoid = -torch.nn.functional.logsigmoid(z)
    nll = torch.nn.functional.cross_entropy(logits[:pairs][masks[:pairs] > 0],
                                            labels[:pairs][masks[:pairs] > 0])
    return (sigmoid + weight * nll).mean()


def test_token_sft_normalisation_equals_trls_sigmoid_plus_sft_under_accumulation():
    """sft_normalize: token gives TRL's [sigmoid, sft] loss on the same token ids, also when
    the batch is split into micro-batches (prepare counts the whole batch's tokens; the engine
    divides the summed loss by the batch's pairs); pair (the default) differs once answers
    differ in length."""
    from apt.trainops.data.datasets.batches import LMBatch, PreferenceBatch
    generator = torch.Generator().manual_seed(0)
    pairs, width, vocab, beta, weight = 6, 7, 11, 0.4, 0.8
    logits = torch.randn(2 * pairs, width, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2 * pairs, width), generator=generator)
    masks = torch.zeros(2 * pairs, width, dtype=torch.float64)
    for row, length in enumerate([1, 5, 2, 6, 3, 4, 2, 2, 5, 1, 6, 3]):   # answers at the end
        masks[row, width - length:] = 1.0
    reference = -torch.rand(pairs, 2, generator=generator, dtype=torch.float64) * 20
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                  reduction="none")
    want = _trl_sigmoid_sft(logits, labels, masks, reference, beta, weight).item()

    def micro(rows):
        side = lambda offset: LMBatch(labels[[offset + r for r in rows]],
                                      labels[[offset + r for r in rows]],
                                      masks[[offset + r for r in rows]])
        return (PreferenceBatch(side(0), side(pairs), reference_logps=reference[rows]),
                per_token[rows + [pairs + r for r in rows]])

    def loss(normalize, splits):
        objective = PreferenceObjective(DPOConfig(beta=beta, sft_weight=weight,
                                                  sft_normalize=normalize))
        batches = [micro(rows) for rows in splits]
        objective.prepare([b for b, _ in batches], run_forward=None)
        return sum(objective._loss(b, t)[0].item() for b, t in batches) / pairs

    whole, split = [list(range(pairs))], [[0, 1], [2, 3], [4, 5]]
    assert loss("token", whole) == pytest.approx(want, rel=1e-10)
    assert loss("token", split) == pytest.approx(want, rel=1e-10)
    assert abs(loss("pair", whole) - want) > 1e-3     # the per-pair mean is another loss


def test_sft_normalize_is_checked():
    with pytest.raises(ConfigError, match="training.dpo.sft_normalize"):
        load_profile("tiny", ["training.dpo.sft_normalize=sequence"])
