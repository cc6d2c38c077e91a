"""One row per model family (issue 26, "What it must show"): import, export, TP2, PP2, LoRA,
SFT / DPO / GRPO, each cell measured.

For each family, transformers builds its small random model from its own config class (the
sizes and perturbed norms/biases/routers of ``tests/test_hf_families.py``) and saves it:
- import: max |logit diff| of ``import_hf``'s APT model against transformers (fp32);
- export: ``export_hf`` of that model, reloaded by transformers: max |logit diff|;
- then ``import_hf_to_weights`` writes a weights directory, and short launches of
  ``launch/train.py`` start from it (``training.init_from``, ``model.*`` = the imported
  config, byte tokenizer, synthetic data, fp32):
  - SFT: one process, chat SFT (synthetic:qa): loss first step -> last step;
  - TP2 / PP2: the same SFT run under ``torchrun --nproc_per_node 2`` with tensor / pipeline
    parallel 2 (MoE: TP2 + sequence parallel): max |loss difference| over the steps against
    the one-process run;
  - LoRA: the SFT run with rank-8 adapters (``lora-tiny``; MoE: on linear_qkv and
    linear_proj only): loss first -> last;
  - DPO (``dpo-tiny``): loss first -> last; GRPO (``grpo-tiny``, 4 generations of 8 tokens):
    completions sampled, the best mean reward of a step (a random model earns none) and the
    largest difference between the sampler's and the trainer's log-probabilities of the
    sampled tokens (the sampler's KV-cache forward against the training forward).

    python bench/hf_families_table.py [--work DIR] [--steps 3] [--families llama3,qwen2,...]

Prints each launch's outcome as it ends and the Markdown table at the end. A failed cell shows
the last line of the failing launch's output instead of a number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not bench/ itself (python puts the script's directory first): its kernels.py would shadow the
# `kernels` package that transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

FAMILIES = ["llama3", "qwen2", "qwen3", "qwen3_moe", "mistral", "gemma"]
SEQ = 48
HYBRID = "training.distributed.strategy=hybrid"


def _model_sets(cfg) -> list[str]:
    from apt.trainops.interop import profile_model_fields
    return [f"model.{k}={json.dumps(v)}" for k, v in profile_model_fields(cfg).items()]


def _common(work: Path, name: str, init: Path, model_sets: list[str], steps: int) -> list[str]:
    return [f"training.init_from={init}", "data.tokenizer=byte", "data.tokenizer_path=null",
            f"data.seq_length={SEQ}", "training.precision=fp32", f"training.max_steps={steps}",
            "training.warmup_steps=0", "training.eval_interval=0", "training.log_interval=1",
            "training.checkpoints.save_interval=0", "training.checkpoints.dir=null",
            f"output.dir={work / 'runs' / name}", f"output.experiment_name={name}",
            "output.sample_tokens=0", "monitoring.plots=false", "hardware.memory_check=false",
            *model_sets]


def _launches(work: Path, init: Path, model_sets: list[str], steps: int, moe: bool):
    """name -> (profile, nproc, overrides). An MoE model: TP2 with sequence parallel (Megatron's
    MoE layer trains only with it) and LoRA on the attention only (no adapters on experts)."""
    sft = ["data.packing=false", "training.batch_size=4", "training.micro_batch_size=2",
           "training.learning_rate=1e-3", "training.min_learning_rate=1e-4"]
    tp2 = [HYBRID, "training.distributed.tensor_parallel=2"] + (
        ["training.distributed.sequence_parallel=true"] if moe else [])
    lora = ["lora.targets=[linear_qkv, linear_proj]"] if moe else []

    def common(name):
        return _common(work, name, init, model_sets, steps)
    return {
        "sft": ("sft-tiny", 1, common("sft") + sft + ["training.distributed.strategy=ddp"]),
        "tp2": ("sft-tiny", 2, common("tp2") + sft + tp2),
        "pp2": ("sft-tiny", 2, common("pp2") + sft +
                [HYBRID, "training.distributed.pipeline_parallel=2"]),
        "lora": ("lora-tiny", 1, common("lora") + sft + ["training.learning_rate=1e-2"] +
                 lora),
        "dpo": ("dpo-tiny", 1, common("dpo") + ["training.batch_size=4",
                                                "training.micro_batch_size=2"]),
        "grpo": ("grpo-tiny", 1, common("grpo") + [
            "training.batch_size=8", "training.micro_batch_size=8",
            "training.grpo.num_generations=4", "training.grpo.num_iterations=1",
            "training.grpo.max_new_tokens=8", "training.grpo.eval_prompts=4"]),
    }


def _launch(profile: str, nproc: int, overrides: list[str], log: Path) -> list[dict]:
    """Run launch/train.py (torchrun for 2 processes); the metrics.jsonl records with a loss."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    start = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    cmd = start + [str(REPO / "launch" / "train.py"), "--profile", profile]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    log.write_text(proc.stdout + proc.stderr)
    out_dir = Path(next(o for o in overrides if o.startswith("output.dir=")).split("=", 1)[1])
    metrics = sorted(out_dir.glob("**/metrics.jsonl"))
    if proc.returncode != 0 or not metrics:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "apt: error" in ln or "Error: " in ln] or lines
        raise RuntimeError(f"exit {proc.returncode}: {errors[-1] if errors else 'no output'} "
                           f"(log {log})")
    records = [json.loads(ln) for ln in metrics[-1].read_text().splitlines() if ln.strip()]
    return [r for r in records if "loss" in r and "step" in r]


def _first_last(records: list[dict]) -> str:
    losses = [r["loss"] for r in records]
    return f"{losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} steps)"


def _max_loss_diff(records: list[dict], reference: list[dict]) -> str:
    ours = {r["step"]: r["loss"] for r in records}
    ref = {r["step"]: r["loss"] for r in reference}
    if sorted(ours) != sorted(ref):
        return f"steps differ: {sorted(ours)} vs {sorted(ref)}"
    return f"{max(abs(ours[s] - ref[s]) for s in ref):.1e} ({len(ref)} steps)"


def family_row(family: str, work: Path, steps: int) -> dict[str, str]:
    import torch
    import transformers
    from tests.test_hf_families import COMMON, _apt_logits, _configs, _hf_logits, _hf_model
    from apt.model.architectures import APTModel
    from apt.trainops.interop import export_hf, import_hf, import_hf_to_weights
    work = work / family
    config, _ = _configs()[family]
    hf = _hf_model(config, seed=len(family))
    hf.save_pretrained(work / "hf")
    tokens = torch.randint(0, COMMON["vocab_size"], (2, 24),
                           generator=torch.Generator().manual_seed(1))
    theirs = _hf_logits(hf, tokens)
    row = {}
    cfg, model = import_hf(work / "hf", APTModel)
    ours = _apt_logits(model, tokens)
    row["import"] = f"{(ours - theirs).abs().max().item():.1e}"
    out = export_hf(model, cfg, work / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    row["export"] = f"{(_hf_logits(reloaded, tokens) - ours).abs().max().item():.1e}"
    import_hf_to_weights(work / "hf", work / "weights", APTModel)
    launches = _launches(work, work / "weights", _model_sets(cfg), steps,
                         moe=bool(cfg.num_experts))
    results = {}
    for name, (profile, nproc, overrides) in launches.items():
        started = time.perf_counter()
        try:
            results[name] = _launch(profile, nproc, overrides, work / f"{name}.log")
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            results[name] = str(error)
        print(f"  {family} {name}: {time.perf_counter() - started:.0f} s "
              f"{'FAILED ' + results[name] if isinstance(results[name], str) else 'ok'}",
              flush=True)

    def cell(name, render):
        got = results[name]
        return f"FAILED: {got}" if isinstance(got, str) else render(got)
    reference = results["sft"]
    for name in ("tp2", "pp2"):
        row[name] = (cell(name, lambda r: _max_loss_diff(r, reference))
                     if not isinstance(reference, str) else "no one-process reference")
    row["lora"] = cell("lora", _first_last)
    grpo = cell("grpo", lambda r: (
        f"{sum(x['completions'] for x in r)} completions, reward "
        f"{max(x['reward'] for x in r):.2f}, sampler vs trainer logp "
        f"{max(abs(x['sampler_logp_diff']) for x in r):.0e}"))
    row["sft / dpo / grpo"] = (f"SFT {cell('sft', _first_last)}; DPO {cell('dpo', _first_last)}"
                               f"; GRPO {grpo}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hf-families-"))
    print(f"work directory {work}", flush=True)
    rows = {}
    for family in args.families.split(","):
        started = time.perf_counter()
        rows[family] = family_row(family, work, args.steps)
        print(f"{family}: {json.dumps(rows[family])} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    columns = ["import", "export", "tp2", "pp2", "lora", "sft / dpo / grpo"]
    print("\n| family | import | export | TP2 | PP2 | LoRA | SFT / DPO / GRPO |")
    print("|---|---|---|---|---|---|---|")
    for family, row in rows.items():
        print(f"| {family} | " + " | ".join(row[c] for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
