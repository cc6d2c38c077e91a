"""The measured gain of GRPO from two starting points, shortened from the grpo-tiny demo.

The tiny model fine-tuned on sums (arith-sft-base, the session fixture in conftest.py shared
with the DPO gain test) is taken at two points of one SFT run: where it first answers 10% of
the held-out sums and where it first answers 25%. From each, the grpo-tiny profile (its
defaults: dynamic sampling on, exact-match reward, 8 completions per prompt) trains for a
fraction of its steps. The reward of the sampled completions must rise, and so must greedy
accuracy on held-out sums, from both bases. Everything is made offline and trains on CPU.
"""
from apt.core.config import load_profile
from apt.trainops.trainers import O1Trainer

STEPS = 40


def _mean(values):
    return sum(values) / len(values)


def test_grpo_raises_reward_and_held_out_accuracy_from_two_bases(arith_sft_bases, tmp_path):
    gains = []
    for k, (base, checkpoint) in enumerate(arith_sft_bases):
        trainer = O1Trainer.from_config(load_profile("grpo-tiny", [
            f"training.init_from={checkpoint}", f"training.max_steps={STEPS}",
            "training.eval_interval=0", "training.grpo.eval_prompts=200",
            f"output.dir={tmp_path / str(k)}"]))
        summary = trainer.train()
        # every sampled completion's reward (the trained batch leaves out all-alike groups)
        rewards = [r["sampling/reward"] for r in trainer.history]
        first, last = _mean(rewards[:10]), _mean(rewards[-10:])
        before, after = summary["initial_val_accuracy"], summary["val_accuracy"]
        dropped = _mean([r["sampling/groups_all_equal"] for r in trainer.history])
        print(f"base {base:.3f}: sampled reward {first:.3f} -> {last:.3f}; held-out greedy "
              f"accuracy {before:.3f} -> {after:.3f}; groups all alike {dropped:.2f}")
        gains.append((base, last - first, after - before))
    # Measured on this machine (one thread; the same numbers with the same code): the SFT run
    # stopped at step 400 (0.132) and step 450 (0.430); from them sampled reward 0.083 -> 0.131
    # and 0.285 -> 0.429, held-out accuracy (200 sums) 0.145 -> 0.190 and 0.475 -> 0.720, with
    # 50% and 19% of the sampled groups all alike. The README's runs are the long version.
    assert len({round(base, 3) for base, _, _ in gains}) == 2, gains   # two distinct bases
    for base, reward_gain, accuracy_gain in gains:
        assert reward_gain >= 0.03, gains
        assert accuracy_gain >= 0.03, gains
