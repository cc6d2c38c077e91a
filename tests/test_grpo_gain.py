"""The measured gain of GRPO, shortened from the grpo-tiny demo.

The tiny model is fine-tuned on sums (synthetic:arith chats) until it answers part of the
held-out sums right (arith-sft-base, shortened), then trained with the grpo-tiny profile
(exact-match reward, 8 completions per prompt) from that checkpoint. The sampled completions'
mean reward must rise, and so must greedy accuracy on held-out sums. Everything is made offline
and trains on CPU.
"""
from apt.core.config import load_profile
from apt.trainops.engine import Finetuner, O1Trainer

SFT_STEPS, GRPO_STEPS = 500, 40


def test_grpo_raises_reward_and_held_out_accuracy(tmp_path):
    checkpoints = tmp_path / "sft-checkpoints"
    Finetuner.from_config(load_profile("arith-sft-base", [
        f"training.max_steps={SFT_STEPS}", f"training.checkpoints.save_interval={SFT_STEPS}",
        f"training.checkpoints.dir={checkpoints}", f"output.dir={tmp_path / 'sft'}",
        "output.sample_tokens=0"])).train()
    trainer = O1Trainer.from_config(load_profile("grpo-tiny", [
        f"training.init_from={checkpoints}", f"training.max_steps={GRPO_STEPS}",
        "training.eval_interval=0", "training.grpo.eval_prompts=200",
        f"output.dir={tmp_path / 'grpo'}"]))
    summary = trainer.train()
    rewards = [r["reward"] for r in trainer.history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    before, after = summary["initial_val_accuracy"], summary["val_accuracy"]
    print(f"sampled reward {first:.3f} -> {last:.3f}; held-out greedy accuracy "
          f"{before:.3f} -> {after:.3f}")
    assert last - first >= 0.1
    assert after > before
