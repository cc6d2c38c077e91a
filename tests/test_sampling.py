"""The RL sampler on one process: prompts of different lengths aligned at their end (left
padding, masked) give each row what the prompt gives alone, in one forward pass per new token.

(The sampler on DP/TP/PP layouts is checked against one process in test_grpo.py.)"""
import pytest
import torch

from apt.core.config import load_profile
from apt.model.architectures import APTModel
from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
from apt.trainops.rl.sampling import SamplingParams, sample

NEW = 7


@pytest.fixture(scope="module")
def model():
    cfg = load_profile("tiny", ["model.max_seq_len=40", "data.seq_length=40"])
    setup_distributed(plan=None)
    seed_everything(0)
    return APTModel(cfg.model).eval()


def _prompts():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=generator) for n in (5, 17, 9, 3, 12)]


def _params(**kw):
    return SamplingParams(max_new_tokens=NEW, eod_id=-1, valid_vocab=256, max_length=40, **kw)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_end_aligned_rows_match_each_prompt_alone_in_one_pass_per_token(model, kv_cache):
    prompts = _prompts()
    passes = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    try:
        greedy = sample([model], prompts, _params(greedy=True, kv_cache=kv_cache),
                        [0] * len(prompts))
        assert len(passes) == greedy.forward_passes == NEW   # a prefill, then one per token
        alone = [sample([model], [p], _params(greedy=True, kv_cache=kv_cache), [0]).tokens[0]
                 for p in prompts]
        assert greedy.tokens == alone
        assert all(len(t) == NEW for t in greedy.tokens)
        # Sampled at temperature 1 (each row its own generator): the same tokens, and the same
        # log-probabilities up to float rounding.
        seeds = list(range(len(prompts)))
        batched = sample([model], prompts, _params(kv_cache=kv_cache), seeds)
        for i, p in enumerate(prompts):
            single = sample([model], [p], _params(kv_cache=kv_cache), [seeds[i]])
            assert batched.tokens[i] == single.tokens[0]
            assert batched.logps[i] == pytest.approx(single.logps[0], abs=1e-5)
    finally:
        hook.remove()


def test_the_kv_cache_gives_what_recomputing_the_prefix_gives(model):
    """The cache holds keys rotated once (apt/model/rotated_key_cache.py) at each row's
    shifted positions: the same tokens and log-probabilities as the uncached passes."""
    prompts, seeds = _prompts(), list(range(5))
    cached = sample([model], prompts, _params(), seeds)
    recomputed = sample([model], prompts, _params(kv_cache=False), seeds)
    assert cached.tokens == recomputed.tokens
    for a, b in zip(cached.logps, recomputed.logps):
        assert a == pytest.approx(b, abs=1e-5)
