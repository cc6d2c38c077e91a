"""The measured gain of GRPO, shortened from the grpo-tiny demo.

From the arith-sft-base checkpoint (the tiny model fine-tuned on sums until it answers a
quarter of the held-out sums, the session fixture in conftest.py shared with the DPO gain
test), the grpo-tiny profile trains with the exact-match reward, 8 completions per prompt, for
a fraction of its steps. The sampled completions' mean reward must rise, and so must greedy
accuracy on held-out sums. Everything is made offline and trains on CPU.
"""
from apt.core.config import load_profile
from apt.trainops.engine import O1Trainer

STEPS = 40


def test_grpo_raises_reward_and_held_out_accuracy(arith_sft_checkpoint, tmp_path):
    trainer = O1Trainer.from_config(load_profile("grpo-tiny", [
        f"training.init_from={arith_sft_checkpoint}", f"training.max_steps={STEPS}",
        "training.eval_interval=0", "training.grpo.eval_prompts=200",
        f"output.dir={tmp_path}"]))
    summary = trainer.train()
    rewards = [r["reward"] for r in trainer.history]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    before, after = summary["initial_val_accuracy"], summary["val_accuracy"]
    print(f"sampled reward {first:.3f} -> {last:.3f}; held-out greedy accuracy "
          f"{before:.3f} -> {after:.3f}")
    # measured on this machine: 0.209 -> 0.312 and 0.335 -> 0.505 (the same numbers every run,
    # from the base that stopped at its target, step 325, 0.314 exact-match)
    assert last - first >= 0.05
    assert after - before >= 0.05
