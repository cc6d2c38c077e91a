"""The measured gain of GRPO, shortened from the grpo-tiny demo.

From the arith-sft-base checkpoint (the tiny model fine-tuned on sums until it answers a
quarter of the held-out sums, the session fixture in conftest.py shared with the DPO gain
test), the grpo-tiny profile trains with the exact-match reward, 8 completions per prompt, for
a fraction of its steps. The sampled completions' mean reward must rise, and so must greedy
accuracy on held-out sums. Everything is made offline and trains on CPU.
"""
from apt.core.config import load_profile
from apt.trainops.engine import O1Trainer

STEPS = 80


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
    # Measured on this machine (the same numbers every run of the same code): from the base
    # that stopped at its target at step 450 with 0.336 exact-match, sampled reward 0.180 ->
    # 0.302 and held-out accuracy 0.330 -> 0.375 over 80 steps (0.320 after 40: the held-out
    # gain depends on where the base's jump landed; session 7's base, step 325 and 0.314,
    # gave 0.335 -> 0.505 after 40). The sampled reward is what GRPO optimises.
    assert last - first >= 0.05
    assert after - before >= 0.02
