"""The measured gain of preference alignment, shortened from the dpo-tiny demo.

The tiny model is fine-tuned on sums (synthetic:arith chats) until it answers a quarter of the
held-out sums (arith-sft-base, the session fixture in conftest.py, shared with the GRPO gain
test: its stronger base), then aligned with the dpo-tiny profile for 250 steps on preference pairs (chosen = the
correct sum, rejected = a near miss) from that checkpoint. Scored on the 500 held-out sums
before and after: the preference accuracy must reach 0.85 and greedy exact-match must rise by
at least 15 points (measured: 0.430 -> 0.936, preference accuracy 0.988, from the base that
stops at step 450 with max_steps 1000, one thread; earlier bases: 0.336 -> 0.796 and 0.898,
0.314 -> 0.892 and 0.961). Everything is made
offline and trains on CPU (about a minute on 2 idle cores).
"""
from apt.core.config import load_profile
from apt.trainops.trainers import ClaudeTrainer


def test_dpo_raises_preference_accuracy_and_exact_match(arith_sft_checkpoint, tmp_path):
    summary = ClaudeTrainer.from_config(load_profile("dpo-tiny", [
        f"training.init_from={arith_sft_checkpoint}", "training.max_steps=250",
        "training.eval_interval=0", f"output.dir={tmp_path / 'dpo'}"])).train()
    before, after = summary["initial_val_exact_match"], summary["val_exact_match"]
    print(f"exact-match {before:.3f} -> {after:.3f}, preference accuracy "
          f"{summary['initial_val_rewards/accuracies']:.3f} -> "
          f"{summary['val_rewards/accuracies']:.3f}")
    assert summary["initial_val_rewards/accuracies"] == 0.0   # the policy is the reference
    assert summary["val_rewards/accuracies"] >= 0.85
    assert after - before >= 0.15
