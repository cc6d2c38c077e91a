"""Trainer overhead: APT's Trainer against a hand-written PyTorch loop, same process.

Both train the same tiny APTModel (Megatron-core GPTModel, same initial weights) on the same
batches with AdamW, warmup+cosine LR and gradient clipping; the Trainer adds the DeepSpeed
engine (ZeRO-1 by default), loss all-reduce, metrics and logging. Throughput is counted over
wall-clock time between step ends after a warm-up; rounds alternate the two loops and the
median of the per-round ratios is reported.

    python bench/trainer_overhead.py [--steps 60] [--warmup 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt.core.logging import configure_logging  # noqa: E402

configure_logging()

import torch  # noqa: E402

from apt.core.config import load_profile  # noqa: E402
from apt.model.architectures import APTModel  # noqa: E402
from apt.trainops.data import create_dataloader  # noqa: E402
from apt.trainops.data.build import build_datasets  # noqa: E402
from apt.trainops.runtime.process_groups import seed_everything, shutdown_distributed  # noqa: E402
from apt.trainops.trainers import Trainer  # noqa: E402
from bench._plain_optimizer import plain_adamw  # noqa: E402


def trainer_round(cfg) -> float:
    trainer = Trainer.from_config(cfg)
    trainer.train()
    return _tokens_per_s([r["time"] for r in trainer.history], cfg)


def plain_round(cfg, train_dataloader) -> float:
    """The loop an engineer would write by hand: no engine, no logging."""
    t = cfg.training
    seed_everything(t.seed)
    model = APTModel(cfg.model)
    optimizer, schedule = plain_adamw(model, t)
    batches = iter(train_dataloader)
    ends = []
    for _ in range(t.max_steps):
        batch = next(batches)
        per_token = model(batch.tokens, None, None, labels=batch.labels)
        loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss.item()  # the Trainer reads the loss too (at log intervals)
        ends.append(time.time())
    return _tokens_per_s(ends, cfg)


def _tokens_per_s(ends, cfg) -> float:
    warm = ARGS.warmup
    steps = len(ends) - warm
    return steps * cfg.training.batch_size * cfg.data.seq_length / (ends[-1] - ends[warm - 1])


def main() -> None:
    out = tempfile.mkdtemp(prefix="apt-bench-")
    cfg = load_profile("tiny", [f"training.max_steps={ARGS.steps}", "training.warmup_steps=5",
                                "training.eval_interval=0", "training.eval_batches=1",
                                "output.sample_tokens=0", f"output.dir={out}",
                                "training.log_interval=20"])
    train_set, _, _ = build_datasets(cfg.data)
    apt_rates, plain_rates = [], []
    for round_number in range(ARGS.rounds):
        apt_rates.append(trainer_round(cfg))
        plain_rates.append(plain_round(cfg, create_dataloader(
            train_set, cfg.training.batch_size, seed=cfg.training.seed)))  # the same batches
        print(f"round {round_number + 1}: trainer {apt_rates[-1]:,.0f} tok/s, plain loop "
              f"{plain_rates[-1]:,.0f} tok/s", flush=True)
    apt, plain = statistics.median(apt_rates), statistics.median(plain_rates)
    # Each round's two runs share the machine's state: the median of the paired ratios is
    # less noisy than the ratio of the medians.
    ratio = statistics.median(a / p for a, p in zip(apt_rates, plain_rates))
    print(f"trainer_overhead: trainer {apt:,.0f} tok/s | plain PyTorch {plain:,.0f} tok/s | "
          f"paired ratio {ratio:.4f} | overhead {(1 - ratio) * 100:+.2f}% "
          f"(threads {torch.get_num_threads()}, {ARGS.steps} steps, {ARGS.warmup} warm-up, "
          f"{ARGS.rounds} rounds)")
    shutdown_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    ARGS = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
