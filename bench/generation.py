"""Generation throughput: the RL sampler with and without its KV cache, one process.

The O1Trainer samples completions with ``apt.trainops.rl.sampling.sample``: with the KV cache
(Megatron-core's static inference context) each new token costs one token's forward pass;
without it every new token recomputes the whole prefix. Both sample the same tokens (checked
here); the table gives new tokens per second, interleaved rounds, median of the per-round
ratios.

    python bench/generation.py [--batch 32] [--prompt 32] [--new 64] [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt.core.logging import configure_logging  # noqa: E402

configure_logging()

import torch  # noqa: E402

from apt.core.config import load_profile  # noqa: E402
from apt.model.architectures import APTModel  # noqa: E402
from apt.trainops.distributed.runtime import seed_everything, setup_distributed  # noqa: E402
from apt.trainops.rl.sampling import SamplingParams, sample  # noqa: E402


def timed(model, prompts, params, seeds):
    start = time.perf_counter()
    out = sample([model], prompts, params, seeds)
    seconds = time.perf_counter() - start
    return out, sum(len(t) for t in out.tokens) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)   # a fixed thread count: comparable numbers on CPU
    length = args.prompt + args.new
    cfg = load_profile(args.profile, [f"model.max_seq_len={length}", f"data.seq_length={length}"])
    setup_distributed(plan=None)   # one process: the model-parallel groups Megatron asks for
    seed_everything(0)
    model = APTModel(cfg.model)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (args.prompt - (i % 4),), generator=generator)
               for i in range(args.batch)]
    seeds = list(range(args.batch))
    rows = {True: [], False: []}
    # eod_id outside the vocabulary the sampler may choose: every row runs --new tokens
    base = dict(max_new_tokens=args.new, eod_id=-1, valid_vocab=256, temperature=1.0,
                max_length=args.prompt + args.new)
    print(f"model {cfg.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}; batch "
          f"{args.batch}, prompts ~{args.prompt} tokens, {args.new} new tokens, "
          f"{args.threads} thread(s)")
    timed(model, prompts[:2], SamplingParams(**base, kv_cache=True), seeds[:2])   # warm-up
    for r in range(args.rounds):
        outputs = {}
        for kv in (True, False):
            outputs[kv], speed = timed(model, prompts, SamplingParams(**base, kv_cache=kv), seeds)
            rows[kv].append(speed)
        same = outputs[True].tokens == outputs[False].tokens
        print(f"round {r + 1}: with KV cache {rows[True][-1]:8.1f} tok/s | without "
              f"{rows[False][-1]:8.1f} tok/s | x{rows[True][-1] / rows[False][-1]:.2f} | "
              f"same tokens {same}")
    ratios = [a / b for a, b in zip(rows[True], rows[False])]
    print(f"median: with KV cache {statistics.median(rows[True]):.1f} tok/s, without "
          f"{statistics.median(rows[False]):.1f} tok/s, speed-up x{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
