"""Where one training step's time goes, APT against a Hugging Face Llama, at a peer_hf shape.

``bench/peer_hf.py`` says how far apart the two are; this says where. One side per run (each
in a fresh process, so neither inherits the other's allocator or threads): after a few
warm-up steps, ``torch.profiler`` records ``--steps`` steps and prints the ops by self CPU
time, with the wall-clock milliseconds per step. APT runs its Trainer in benchmark mode (the
peer_hf configuration); the HF side runs ``LlamaForCausalLM`` of the same shape in a plain
loop with torch's fused AdamW (the HF Trainer's default optimizer) and clipping.

    python bench/peer_profile.py --shape large --side apt
    python bench/peer_profile.py --shape large --side hf

The profiler adds a per-op cost that counts against the side with more (smaller) ops, so
compare the op table, not these milliseconds, with peer_hf's tokens/s.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import peer_hf  # noqa: E402
from apt.core.config import with_overrides  # noqa: E402
from apt.trainops.callbacks import Callback  # noqa: E402


class _Window:
    """Starts the profiler before step ``first`` and stops it before step ``last``."""

    def __init__(self, first: int, last: int, by_shape: bool = False):
        self.first, self.last, self.marks = first, last, {}
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               record_shapes=by_shape)

    def at(self, step: int) -> None:
        if step == self.first:
            self.marks["start"] = time.perf_counter()
            self.profiler.start()
        elif step == self.last:
            self.profiler.stop()
            self.marks["end"] = time.perf_counter()

    def ms_per_step(self) -> float:
        return (self.marks["end"] - self.marks["start"]) * 1000 / (self.last - self.first)


def profile_apt(cfg, train_set, window: _Window) -> None:
    class AtStepStart(Callback):
        def on_step_start(self, trainer, step):
            window.at(step)

    t = cfg.training
    loader = peer_hf.create_dataloader(train_set, t.batch_size, seed=t.seed)
    peer_hf.Trainer.from_config(cfg, train_dataloader=loader, callbacks=[AtStepStart()]).train()


def profile_hf(cfg, tokens, window: _Window) -> None:
    t = cfg.training
    with peer_hf.as_a_user_runs_hf():
        model = peer_hf.hf_llama(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate,
                                      weight_decay=t.weight_decay, fused=True)
        for step in range(t.max_steps):
            window.at(step)
            ids = tokens[step * t.batch_size:(step + 1) * t.batch_size]
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(peer_hf.SHAPES))
    parser.add_argument("--side", default="apt", choices=("apt", "hf"))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=30, help="ops shown")
    parser.add_argument("--apt-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--by-shape", action="store_true",
                        help="one row per op and input shapes (which matmul is slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peer_hf.ARGS = types.SimpleNamespace(quick=False, apt_override=args.apt_override,
                                         model_kernels=None)
    cfg = peer_hf.apt_config(args.shape, f"/tmp/apt-peer-profile-{args.shape}")
    warmup = 2   # steps before the profiled ones (allocator, oneDNN primitives warmed up)
    total = warmup + args.steps + 1
    cfg = with_overrides(cfg, {"training.max_steps": total,
                               "training.warmup_steps": min(cfg.training.warmup_steps, total)})
    t = cfg.training
    train_set, _, _ = peer_hf.build_datasets(cfg.data, model_vocab_size=cfg.model.vocab_size,
                                             seed=t.seed)
    window = _Window(warmup, warmup + args.steps, args.by_shape)
    if args.side == "apt":
        profile_apt(cfg, train_set, window)
    else:
        loader = iter(peer_hf.create_dataloader(train_set, t.batch_size, seed=t.seed))
        tokens = torch.cat([next(loader).tokens for _ in range(t.max_steps)])
        profile_hf(cfg, tokens, window)
    print(f"\n== {args.side} at {args.shape}: {window.ms_per_step():.1f} ms/step under the "
          f"profiler ({args.steps} steps, {args.threads} threads)")
    averages = window.profiler.key_averages(group_by_input_shape=args.by_shape)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                         max_name_column_width=60, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
