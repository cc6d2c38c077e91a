"""CPU truth for the performance model: this machine's measured step against the predicted one.

For a few parallel-matrix layouts (DP=2, TP=2+SP, PP=2) on 2 gloo processes, each run trains a
small Llama-style model in benchmark mode, then measures on the same processes what the model
needs as "hardware": the fp32 GEMM rate (the model's MLP linear, forward and backward), the
attention rate (torch's SDPA, which the CPU layers run, forward and backward), the copy bandwidth
and gloo's all-reduce bandwidth and latency. apt/trainops/perf predicts the step from those
rates alone and the table shows both.

The host's framework time (Python, autograd, Megatron's module code, the loop) is part of a CPU
step, since a CPU is its own device. It is measured, not fitted to the step: the same layout
trains a model 16x narrower (hidden 32), whose arithmetic is negligible, with 4 and with 8
layers; the two step times give the framework time per layer and micro-batch and per step
(solved through the model itself, so both enter the prediction exactly as the model applies
them). The prediction of the 512-wide step is printed with and without that term.

    python bench/perf_model_cpu.py [--steps 6] [--warmup 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = ["model.hidden_size=512", "model.num_layers=4", "model.num_attention_heads=8",
         "model.num_query_groups=4", "model.ffn_hidden_size=1408", "model.max_seq_len=256",
         "data.seq_length=256", "training.batch_size=8", "training.micro_batch_size=2",
         "training.eval_interval=0", "output.sample_tokens=0", "monitoring.plots=false",
         "data.max_corpus_bytes=300000"]
NARROW = ["model.hidden_size=32", "model.ffn_hidden_size=64"]   # 8 heads of 4, 4 KV groups
D = "training.distributed."
LAYOUTS = {"DP=2": [D + "strategy=ddp"],
           "TP=2 SP": [D + "strategy=hybrid", D + "tensor_parallel=2", D + "sequence_parallel=true"],
           "PP=2": [D + "strategy=hybrid", D + "pipeline_parallel=2"]}


def model_overrides(narrow: bool, layers: int) -> list[str]:
    return MODEL + (NARROW if narrow else []) + [f"model.num_layers={layers}"]


def mean_seconds(fn, seconds: float = 1.0) -> float:
    """Mean wall time of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return (time.perf_counter() - start) / count


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from apt.core.config import load_profile
    from apt.core.logging import configure_logging
    from apt.trainops.trainers import Trainer
    from apt.trainops.trainers.benchmark import benchmark_config, benchmark_summary
    from apt.trainops.eval.flops import measure_matmul_flops
    configure_logging()
    cfg = load_profile("tiny", model_overrides(args.narrow, args.layers) + LAYOUTS[args.layout]
                       + [f"output.dir={args.out}"])
    trainer = Trainer.from_config(benchmark_config(cfg, args.steps, args.warmup))
    trainer.train()
    result = benchmark_summary(trainer, args.warmup)
    if args.narrow:                              # only the step time of the narrow model
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps({"step_time_s": result["step_time_s"]}), flush=True)
        return
    gemm = measure_matmul_flops(1024, repeats=5)
    # The best of five 1024^3 products is the machine's burst rate; the step is a mean over
    # seconds, and a linear's backward runs two more products of other shapes (dX through
    # oneDNN, dW = dY^T X through aten::mm, the slower of the three here). The rate the model
    # is given is timed like the step: the mean over ~1 s of this model's own MLP linear
    # (one micro-batch's tokens x hidden -> this rank's share of the gated MLP width), forward
    # and backward, through the op the layout's linears run on CPU: oneDNN's linear
    # (apt/kernels/linear.py), or with sequence parallelism Megatron's own
    # LinearWithGradAccumulationAndAsyncCommunication, i.e. torch.matmul against the
    # transposed weight (aten::mm, several times slower per FLOP here).
    from apt.kernels.linear import linear
    d = cfg.training.distributed
    x = torch.randn(2 * 256, 512, requires_grad=True)
    w = torch.randn(2 * 1408 // d.tensor_parallel, 512, requires_grad=True)
    op = (lambda: torch.matmul(x, w.t())) if d.sequence_parallel else (lambda: linear(x, w))
    gemm_mean = 3 * 2 * x.shape[0] * w.shape[0] * x.shape[1] / mean_seconds(
        lambda: op().sum().backward())
    # Attention runs torch's SDPA (its CPU flash kernel), forward and backward; its rate in
    # the model's own count (4 x queries x mean keys x q_dim forward, 2.5x that backward)
    # becomes the attention fraction of the GEMM rate.
    q, k, v = (torch.randn(2, 8, 256, 64, requires_grad=True) for _ in range(3))
    attn_flops = 3.5 * 4 * 2 * 256 * (256 / 2) * 8 * 64
    sdpa = torch.nn.functional.scaled_dot_product_attention
    attention_rate = attn_flops / mean_seconds(
        lambda: sdpa(q, k, v, is_causal=True).sum().backward())
    a = torch.empty(16 * 2**20 // 4)
    start = time.perf_counter()
    for _ in range(5):
        a.clone()
    copy_bw = 5 * 2 * a.numel() * 4 / (time.perf_counter() - start)
    times = {}
    for n in (16 * 2**20 // 4, 1):
        t = torch.ones(n)
        dist.all_reduce(t)
        start = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(t)
        times[n] = (time.perf_counter() - start) / 5
    latency = times[1] / 2                       # two ring steps for two ranks
    bus = 4 * 16 * 2**20 // 4 / (times[16 * 2**20 // 4] - 2 * latency)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"step_time_s": result["step_time_s"], "gemm_flops": gemm,
                                      "gemm_mean_flops": gemm_mean,
                                      "attention_flops": attention_rate,
                                      "load_average": os.getloadavg()[0],
                                      "copy_bytes_s": copy_bw, "gloo_bytes_s": bus,
                                      "gloo_latency_s": latency}), flush=True)


def cpu_hardware(measured: dict, host_layer_s: float = 0.0, host_step_s: float = 0.0):
    from apt.trainops.perf import Hardware
    return Hardware(name="this CPU", peak_flops={"tf32": measured["gemm_mean_flops"]},
                    hbm_bytes_s=measured["copy_bytes_s"], nvlink_bytes_s=measured["gloo_bytes_s"],
                    network_bytes_s=measured["gloo_bytes_s"], nvlink_domain=2, sms=None,
                    gemm_fraction=1.0, hbm_fraction=1.0,
                    attention_fraction=measured["attention_flops"] / measured["gemm_mean_flops"],
                    collective_fraction=1.0, latency_s={"nvlink": measured["gloo_latency_s"],
                                                        "network": measured["gloo_latency_s"]},
                    host_layer_s=host_layer_s, host_step_s=host_step_s, host_serial=True)


def predict_on(hw, layout: str, narrow: bool = False, layers: int = 4):
    from apt.core.config import load_profile
    from apt.trainops.distributed.plan import make_plan
    from apt.trainops.perf import layout_from_plan, predict, shape_from_config
    cfg = load_profile("tiny", model_overrides(narrow, layers) + LAYOUTS[layout])
    plan = make_plan(cfg, 2, 2, device_type="cpu")
    return predict(shape_from_config(cfg.model, cfg.data.seq_length), layout_from_plan(plan),
                   hw)


def host_time(measured: dict, layout: str, narrow4_s: float, narrow8_s: float):
    """(per layer and micro-batch, per step) framework seconds that make the model reproduce
    the narrow model's two measured steps: the model is linear in both, so two evaluations
    per layer count give its coefficients."""
    def coefficients(layers):
        base = predict_on(cpu_hardware(measured), layout, True, layers).step_s
        per_layer = predict_on(cpu_hardware(measured, host_layer_s=1.0), layout, True,
                               layers).step_s - base
        return base, per_layer
    (b4, l4), (b8, l8) = coefficients(4), coefficients(8)
    layer_s = max(0.0, ((narrow8_s - b8) - (narrow4_s - b4)) / (l8 - l4))
    step_s = max(0.0, narrow4_s - b4 - l4 * layer_s)
    return layer_s, step_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layout", default=None, help=argparse.SUPPRESS)   # worker mode
    parser.add_argument("--out", default="/tmp/perf_model_cpu", help=argparse.SUPPRESS)
    parser.add_argument("--narrow", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(layout, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", __file__, "--layout", layout, "--steps", str(args.steps),
               "--warmup", str(args.warmup), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"{layout} {extra}: {proc.stderr[-400:]!r}")
        return json.loads(lines[-1][7:])

    print("| layout | measured step | predicted | error | without host time | host ms per "
          "layer x micro-batch, per step | GEMM GFLOP/s mean (best) | gloo GB/s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        try:
            measured = run(layout)
            narrow4 = run(layout, "--narrow", "--layers", "4")["step_time_s"]
            narrow8 = run(layout, "--narrow", "--layers", "8")["step_time_s"]
        except RuntimeError as exc:
            print(f"| {layout} | failed: {exc} |")
            continue
        layer_s, step_host_s = host_time(measured, layout, narrow4, narrow8)
        p = predict_on(cpu_hardware(measured, host_layer_s=layer_s, host_step_s=step_host_s),
                       layout)
        bare = predict_on(cpu_hardware(measured), layout)
        step = measured["step_time_s"]
        print(f"| {layout} | {step * 1000:.1f} ms | {p.step_s * 1000:.1f} ms"
              f" | {p.step_s / step - 1:+.0%} | {bare.step_s * 1000:.1f} ms "
              f"({bare.step_s / step - 1:+.0%}) | {layer_s * 1000:.2f}, {step_host_s * 1000:.0f}"
              f" | {measured['gemm_mean_flops'] / 1e9:.1f} ({measured['gemm_flops'] / 1e9:.1f})"
              f" | {measured['gloo_bytes_s'] / 1e9:.2f} | {measured['load_average']:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
