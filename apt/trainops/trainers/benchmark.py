"""Benchmark mode: N measured training steps after a warm-up, one summary line.

The steps run through the normal Trainer loop (same engine, same data path), with evaluation,
sampling and logging reduced to the minimum; the summary averages the steps after warm-up:

    benchmark | tiny | TP=1 PP=1 DP=1 fp32 | 50 steps after 10 warm-up | 10,512 tok/s
    (10,512/device) | 97.4 ms/step | MFU 17.8% of 0.30 TFLOP/s/device (measured ...) | ...
"""
from __future__ import annotations

import statistics

from apt.core.config import APTConfig, with_overrides


def benchmark_config(config: APTConfig, steps: int, warmup: int) -> APTConfig:
    total = steps + warmup
    return with_overrides(config, {
        "training.max_steps": total, "training.warmup_steps": min(config.training.warmup_steps,
                                                                  total),
        "training.eval_interval": 0, "training.eval_batches": 1, "training.eval_task": None,
        "training.log_interval": total, "output.sample_tokens": 0,
        "output.experiment_name": f"{config.output.experiment_name or config.name}-benchmark"})


def benchmark_summary(trainer, warmup: int) -> dict:
    measured = trainer.history[warmup:]
    if not measured:
        raise ValueError(f"no steps after {warmup} warm-up steps")
    step_time = statistics.mean(r["step_time"] for r in measured)
    tokens_per_step = trainer.plan.tokens_per_step
    perf = next(c for c in trainer.callbacks if hasattr(c, "flops_per_token"))
    tokens_per_s = tokens_per_step / step_time
    memory = {k: max(r[k] for r in measured) for k in measured[-1] if k.startswith("mem_")}
    return {"steps": len(measured), "warmup": warmup, "step_time_s": step_time,
            "step_time_p90_s": sorted(r["step_time"] for r in measured)[int(0.9 * (len(measured) - 1))],
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / perf.devices,
            "mfu": tokens_per_s * perf.flops_per_token / (perf.peak_flops * perf.devices),
            "peak_flops_per_device": perf.peak_flops, "peak_flops_source": perf.peak_source,
            "data_wait_s": statistics.mean(r["data_wait_s"] for r in measured), **memory}


def format_benchmark(trainer, result: dict) -> str:
    p = trainer.plan
    memory = " | ".join(f"{k[4:]} {v:.2f} GiB" for k, v in result.items() if k.startswith("mem_"))
    return (f"benchmark | {trainer.config.name} | TP={p.tp} PP={p.pp} DP={p.dp} {p.precision} | "
            f"{result['steps']} steps after {result['warmup']} warm-up | "
            f"{result['tokens_per_s']:,.0f} tok/s ({result['tokens_per_s_per_device']:,.0f}/device)"
            f" | {result['step_time_s'] * 1000:.1f} ms/step (p90 "
            f"{result['step_time_p90_s'] * 1000:.1f}) | MFU {result['mfu']:.1%} of "
            f"{result['peak_flops_per_device'] / 1e12:.2f} TFLOP/s/device "
            f"({result['peak_flops_source']}) | {memory} | data wait "
            f"{result['data_wait_s'] * 1000:.2f} ms/step")


def run_benchmark(config: APTConfig, steps: int = 50, warmup: int = 10, **trainer_kwargs) -> dict:
    """Train ``warmup + steps`` steps, print the one-line summary on the main rank, return it."""
    from apt.trainops.trainers import Trainer
    trainer = Trainer.from_config(benchmark_config(config, steps, warmup), **trainer_kwargs)
    trainer.train()
    result = benchmark_summary(trainer, warmup)
    line = format_benchmark(trainer, result)
    if trainer.runtime.is_main:
        print(line, flush=True)
        trainer.artifacts.save_text("benchmark.txt", line)
    return {**result, "line": line}
