"""CPU truth for the performance model: this machine's measured step against the predicted one.

For a few parallel-matrix layouts (DP=2, TP=2+SP, PP=2) on 2 gloo processes, each run trains a
small Llama-style model in benchmark mode, then measures on the same processes what the model
needs as "hardware": the fp32 GEMM rate (the GEMM the model's linears run), the copy bandwidth
and gloo's all-reduce bandwidth and latency. apt/trainops/perf predicts the step from those
rates alone (unfused attention: Megatron's local spec) and the table shows both.

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
D = "training.distributed."
LAYOUTS = {"DP=2": [D + "strategy=ddp"],
           "TP=2 SP": [D + "strategy=hybrid", D + "tensor_parallel=2", D + "sequence_parallel=true"],
           "PP=2": [D + "strategy=hybrid", D + "pipeline_parallel=2"]}


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from apt.core.config import load_profile
    from apt.core.logging import configure_logging
    from apt.trainops.trainers import Trainer
    from apt.trainops.trainers.benchmark import benchmark_config, benchmark_summary
    from apt.trainops.eval.flops import measure_matmul_flops
    configure_logging()
    cfg = load_profile("tiny", MODEL + LAYOUTS[args.layout] + [f"output.dir={args.out}"])
    trainer = Trainer.from_config(benchmark_config(cfg, args.steps, args.warmup))
    trainer.train()
    result = benchmark_summary(trainer, args.warmup)
    gemm = measure_matmul_flops(1024, repeats=5)
    # The best of five 1024^3 products is the machine's burst rate; the step is a mean over
    # seconds of a machine shared with other jobs. The rate the model is given is timed the
    # same way as the step: the mean over ~1 s of this model's own MLP product (one
    # micro-batch's tokens x hidden, into the gated MLP width), through the kernel the linears
    # use on CPU (apt/kernels/linear.py).
    from apt.kernels.linear import onednn_linear, supported
    x = torch.randn(2 * 256, 512)
    w = torch.randn(2 * 1408, 512)
    linear = ((lambda: onednn_linear(x, w, None)) if supported(x, w)
              else (lambda: torch.nn.functional.linear(x, w)))
    linear()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        linear()
        count += 1
    gemm_mean = count * 2 * x.shape[0] * w.shape[0] * x.shape[1] / (time.perf_counter() - start)
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
                                      "load_average": os.getloadavg()[0],
                                      "copy_bytes_s": copy_bw, "gloo_bytes_s": bus,
                                      "gloo_latency_s": latency}), flush=True)


def predict_from(measured: dict, layout: str, gemm_key: str = "gemm_mean_flops"):
    from apt.core.config import load_profile
    from apt.trainops.distributed.plan import make_plan
    from apt.trainops.perf import Hardware, layout_from_plan, predict, shape_from_config
    cfg = load_profile("tiny", MODEL + LAYOUTS[layout])
    plan = make_plan(cfg, 2, 2, device_type="cpu")
    hw = Hardware(name="this CPU", peak_flops={"tf32": measured[gemm_key]},
                  hbm_bytes_s=measured["copy_bytes_s"], nvlink_bytes_s=measured["gloo_bytes_s"],
                  network_bytes_s=measured["gloo_bytes_s"], nvlink_domain=2, sms=None,
                  gemm_fraction=1.0, attention_fraction=1.0, hbm_fraction=1.0,
                  collective_fraction=1.0, latency_s={"nvlink": measured["gloo_latency_s"],
                                                      "network": measured["gloo_latency_s"]})
    return predict(shape_from_config(cfg.model, cfg.data.seq_length), layout_from_plan(plan),
                   hw, fused_attention=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layout", default=None, help=argparse.SUPPRESS)   # worker mode
    parser.add_argument("--out", default="/tmp/perf_model_cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    print("| layout | measured step | predicted step | error | predicted at the best GEMM | "
          "GEMM GFLOP/s mean (best) | gloo GB/s | load average |")
    print("|---|---|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", __file__, "--layout", layout, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"| {layout} | failed: {proc.stderr[-400:]!r} |")
            continue
        measured = json.loads(lines[-1][7:])
        p = predict_from(measured, layout)
        best = predict_from(measured, layout, "gemm_flops")
        step = measured["step_time_s"]
        print(f"| {layout} | {step * 1000:.1f} ms | {p.step_s * 1000:.1f} ms"
              f" | {p.step_s / step - 1:+.0%} | {best.step_s * 1000:.1f} ms "
              f"({best.step_s / step - 1:+.0%}) | {measured['gemm_mean_flops'] / 1e9:.1f} "
              f"({measured['gemm_flops'] / 1e9:.1f}) | {measured['gloo_bytes_s'] / 1e9:.2f} | "
              f"{measured['load_average']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
