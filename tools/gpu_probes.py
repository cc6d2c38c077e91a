#!/usr/bin/env python3
"""The measurements of tools/gpu_check.py, each run in its own child process by it:

    python tools/gpu_probes.py NAME [options]    ->  one JSON object, the last stdout line

``versions`` and ``environment`` (what is installed, the device), ``benchmark`` (the Trainer's
benchmark mode on a profile), ``async_checkpoint`` (stall of an asynchronous save) and
``eval_export`` (evaluation, ``export-hf``, transformers' logits against APT's).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def probe_versions(_args, import_check: bool = True) -> dict:
    from importlib import metadata
    out = {}
    for dist in ("torch", "megatron-core", "deepspeed", "transformer-engine", "transformers",
                 "triton", "pydantic", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if import_check:   # importable, not only installed (the install section asks)
        import deepspeed  # noqa: F401
        import megatron.core  # noqa: F401
    return out


def probe_environment(_args) -> dict:
    import platform
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "versions": probe_versions(_args, import_check=False)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20).stdout.strip().splitlines()[0]
            out["driver"], _, out["max_sm_clock"] = (s.strip() for s in smi.split(","))
        except Exception as exc:
            out["driver"] = f"nvidia-smi failed: {exc}"
        device, dtype, n = "cuda", torch.bfloat16, 8192
    else:
        out.update(gpu=None, gpu_count=0, driver=None, nccl=None, cudnn=None,
                   cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        device, dtype, n = "cpu", torch.float32, 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out["matmul"] = {"n": n, "dtype": str(dtype).replace("torch.", ""),
                     "tflops": round(2 * n ** 3 / _timed(torch, lambda: a @ b, 10) / 1e12, 4)}
    out["hbm"], out["attention"] = _hbm_copy(torch, device), _attention_rate(torch, device, dtype)
    return out


def _timed(torch, fn, reps: int) -> float:
    """Mean seconds of ``fn`` over ``reps`` calls after three warm-up calls."""
    for _ in range(3):
        fn()
    _sync(torch)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(torch)
    return (time.perf_counter() - start) / reps


def _hbm_copy(torch, device: str) -> dict:
    """Device-memory bandwidth of a large copy (read + write), what the performance model's
    element-wise and optimizer terms stream at (its hbm_fraction, apt/trainops/perf)."""
    numel = (1 << 30 if device == "cuda" else 1 << 26) // 4
    a = torch.empty(numel, device=device)
    b = torch.empty_like(a)
    seconds = _timed(torch, lambda: b.copy_(a), 10)
    return {"bytes": 2 * 4 * numel, "gbs": round(2 * 4 * numel / seconds / 1e9, 1)}


def _attention_rate(torch, device: str, dtype) -> dict:
    """Causal scaled-dot-product attention, forward + backward, in the performance model's
    FLOP count (4 x tokens x mean keys x q_dim forward, 2.5x that backward: 3.5x in all), the
    rate its attention_fraction stands for (apt/trainops/perf/compute.py)."""
    import torch.nn.functional as F
    b, h, s, d = (4, 16, 4096, 128) if device == "cuda" else (1, 4, 512, 64)
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    seconds = _timed(torch, lambda: F.scaled_dot_product_attention(
        q, k, v, is_causal=True).sum().backward(), 5)
    flops = 3.5 * 4 * b * s * (s / 2) * h * d
    return {"batch": b, "heads": h, "seq": s, "head_dim": d,
            "dtype": str(dtype).replace("torch.", ""), "tflops": round(flops / seconds / 1e12, 4)}


def probe_benchmark(args) -> dict:
    """``run_benchmark`` (the Trainer's benchmark mode) on a profile; ``--spec local`` forces
    Megatron's local layer spec even where Transformer Engine is installed."""
    os.environ["APT_TRANSFORMER_ENGINE"] = "0" if args.spec == "local" else "1"
    from apt.core.config import load_profile
    from apt.core.logging import configure_logging
    from apt.model.megatron_gpt import transformer_engine_installed
    from apt.trainops.distributed import shutdown_distributed
    from apt.trainops.trainers.benchmark import benchmark_config, benchmark_summary
    from apt.trainops.trainers import Trainer
    configure_logging()
    config = benchmark_config(load_profile(args.profile, args.overrides), args.steps, args.warmup)
    try:
        trainer = Trainer.from_config(config)
        trainer.train()
        result = benchmark_summary(trainer, args.warmup)
        params = sum(p.numel() for m in trainer.modules for p in m.parameters())
        result.update(precision=trainer.plan.precision, micro_batch=trainer.plan.micro_batch,
                      grad_accum=trainer.plan.grad_accum, parameters=params,
                      tokens_per_step=trainer.plan.tokens_per_step)
    except Exception as exc:
        if args.oom_ok and "out of memory" in str(exc).lower():
            return {"oom": True, "error": str(exc).splitlines()[0][:300]}
        raise
    finally:
        shutdown_distributed()
    result.update(spec=args.spec, transformer_engine_installed=transformer_engine_installed())
    return result


def probe_async_checkpoint(args) -> dict:
    """bench/checkpoint_io.py's trainer (model + optimizer on the run's device), one
    synchronous save, then one asynchronous save: the loop's stall, the steps run while the
    writer works, the commit."""
    import importlib.util
    import statistics
    spec = importlib.util.spec_from_file_location("checkpoint_io", REPO / "bench" /
                                                  "checkpoint_io.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    trainer, batches = bench.build(argparse.Namespace(hidden=args.hidden, layers=args.layers),
                                   directory)
    manager = trainer.checkpoints
    base = [bench.step(trainer, batches) for _ in range(4)][1:]
    manager.async_save = False
    start = time.perf_counter()
    trainer.save_checkpoint()
    sync_s = time.perf_counter() - start
    size = manager.last_save["bytes"]
    bench.step(trainer, batches)
    manager.async_save = True
    start = time.perf_counter()
    stall = trainer.save_checkpoint().stall_s
    during = []
    while manager.writing_in_background():
        during.append(bench.step(trainer, batches))
    committed = manager.wait()
    total = time.perf_counter() - start
    state = manager.load(committed)   # verified (sizes + SHA-256 of every file)
    device = str(next(trainer.modules[0].parameters()).device)
    return {"device": device, "parameters": sum(p.numel() for m in trainer.modules
                                                for p in m.parameters()),
            "checkpoint_mib": round(size / 2**20, 1), "sync_save_s": round(sync_s, 3),
            "async_stall_s": round(stall, 4), "stall_vs_sync": round(stall / sync_s, 4),
            "async_commit_after_s": round(total, 3), "steps_during_write": len(during),
            "step_time_s": round(statistics.median(base), 4),
            "step_time_during_write_s": round(statistics.median(during), 4) if during else None,
            "committed": str(state.path)}


def probe_eval_export(args) -> dict:
    """Evaluate the run's weights on the profile's held-out split, export them with
    ``apt export-hf``, load the export with transformers and compare logits with APT's."""
    import torch
    from apt.cli import main as apt_main
    from apt.core.config import load_profile
    from apt.model.architectures import APTModel
    from apt.trainops.data.build import build_datasets
    from apt.trainops.eval import Evaluator
    config = load_profile(args.profile, args.overrides)
    model = APTModel.from_pretrained(args.run)
    device = next(model.parameters()).device
    _, eval_dataset, tokenizer = build_datasets(config.data)
    start = time.perf_counter()
    results = Evaluator(model, eval_dataset, metrics=["loss", "perplexity", "accuracy"]).evaluate()
    eval_s = time.perf_counter() - start
    shutil.rmtree(args.out, ignore_errors=True)
    argv = ["export-hf", "--profile", args.profile, "--weights", str(Path(args.run) / "model" /
                                                                      "dist"), "--out", args.out]
    for item in args.overrides:
        argv += ["--set", item]
    if apt_main(argv) != 0:
        raise RuntimeError("export-hf failed")
    from transformers import AutoModelForCausalLM
    torch.backends.cuda.matmul.allow_tf32 = False   # compare fp32 with fp32, not TF32 noise
    hf = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device).eval()
    tokens = torch.tensor([tokenizer.encode("def main():\n    return 0\n")], device=device)
    with torch.no_grad():
        ours = model.eval().float()(tokens, torch.arange(tokens.shape[1], device=device)[None],
                                    None).float()
        theirs = hf(tokens).logits.float()
    vocab = min(ours.shape[-1], theirs.shape[-1])
    diff = (ours[..., :vocab] - theirs[..., :vocab]).abs().max().item()
    if not diff < 1e-3:
        raise RuntimeError(f"exported logits differ from APT's by {diff:.3g}")
    return {"device": str(device), "weights": str(args.run), "eval_seconds": round(eval_s, 2),
            **{f"val_{k}": v for k, v in results.items()}, "hf_dir": args.out,
            "hf_files": sorted(os.listdir(args.out)), "hf_max_logit_diff": diff}


PROBES = {"versions": probe_versions, "environment": probe_environment,
          "benchmark": probe_benchmark, "async_checkpoint": probe_async_checkpoint,
          "eval_export": probe_eval_export}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(PROBES))
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--spec", choices=["local", "transformer_engine"], default="local")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--oom-ok", action="store_true")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--run", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = PROBES[args.name](args)
    print(json.dumps(result, default=str), flush=True)
    return 0


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
