#!/usr/bin/env python3
"""GPU readiness in one call: every check worth running on a lent GPU, one JSON report.

    tools/gpu_check.sh            on the GPU machine (after `make gpu-check` prepared the wheels)
    tools/gpu_check.sh --dry      the same sections on CPU: tiny model, few steps (the test suite)

Writes ``$OUT/gpu_check.json`` (rewritten after every section, so a run cut short still reports
what it did) and ``$OUT/gpu_check.log`` (every command and its output). Sections run in order,
each time-boxed (its own budget, never past the overall deadline) and failure-isolated: the
real work runs in child processes (``launch/train.py``, or ``tools/gpu_probes.py``), a
section that fails or times out records its error and the next one starts.

  install           the carried wheels (.gpu-wheels/: megatron-core, DeepSpeed, small deps) into
                    a target directory, ``pip install --no-index --no-deps`` (skipped in --dry)
  environment       GPU, driver, CUDA, cuDNN, torch, NCCL, library versions, a timed matmul
  kernels           every ``kernels/*/check.py``: built from source there, compared with eager,
                    timed; each prints one JSON object as its last line (skipped when none)
  train_125m        the 125m profile in bf16 (local layer spec; Transformer Engine's too when it
                    is installed), benchmark mode: tokens/s and MFU
  micro_batch_1b    the 1b profile's micro-batch doubled until out of memory: the largest that
                    fits, its tokens/s and MFU against Megatron-LM's published 41-48% (H100)
  fp16_resume       fp16 run with a checkpoint halfway, resumed from it: losses and dynamic loss
                    scale per step compared bit for bit
  async_checkpoint  an asynchronous save of the model and optimizer state staged from device
                    memory: how long the loop stalls, against a synchronous save
  eval_export       evaluation and ``export-hf`` of the GPU-trained weights; transformers loads
                    the export and its logits are compared with APT's
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

# Only the standard library at module level: the driver starts before anything is installed.
REPO = Path(__file__).resolve().parents[1]
PROBES_SCRIPT = REPO / "tools" / "gpu_probes.py"   # the in-process measurements
REPORT, LOG = "gpu_check.json", "gpu_check.log"
ANCHOR_MFU = {"source": "Megatron-LM, GPT models on H100 (published)", "low": 0.41, "high": 0.48}

# Per-section budgets in seconds on the GPU; the whole run stops at TOTAL_BUDGET_S (< 8 min).
# Without kernels they add up to 7.5 minutes; kernels (issue 14: three builds side by side,
# then each check) get a minute and a half, and
# past the overall deadline the remaining sections are recorded as skipped.
BUDGETS = {"install": 50, "environment": 25, "kernels": 90, "train_125m": 80,
           "micro_batch_1b": 150, "fp16_resume": 65, "async_checkpoint": 40, "eval_export": 40}
TOTAL_BUDGET_S = 470
# The dry run checks that the script works, not how fast: budgets wide enough for a loaded
# 2-core CI machine (the dry run needs about 90 s of CPU time).
DRY_BUDGETS = {name: 300 for name in BUDGETS}
DRY_TOTAL_BUDGET_S = 1200

# The dry run's model: the tiny profile shrunk further, so the whole check stays cheap on CPU.
DRY_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
             "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=32",
             "data.seq_length=32", "data.max_corpus_bytes=200000"]
# fp16_resume's GPU model, which eval_export then evaluates and exports: the 125m shape with
# 4 layers and 1024-token rows (checkpoints of ~0.7 GiB, two runs in about a minute).
GPU_SMALL = ["model.num_layers=4", "model.max_seq_len=1024", "data.seq_length=1024",
             "training.batch_size=16", "training.micro_batch_size=8"]
QUIET = ["training.eval_interval=0", "training.eval_batches=1", "output.sample_tokens=0",
         "monitoring.plots=false"]


class SectionSkipped(Exception):
    """Raised by a section that has nothing to do here (recorded as ``skipped`` with why)."""


class Check:
    def __init__(self, out: Path, work: Path, dry: bool, wheels: Path, site: Path):
        self.out, self.work, self.dry, self.wheels, self.site = out, work, dry, wheels, site
        self.python = sys.executable
        self.started = time.monotonic()
        self.deadline = self.started + (DRY_TOTAL_BUDGET_S if dry else TOTAL_BUDGET_S)
        self.section_deadline = self.deadline
        self.log = open(out / LOG, "a", buffering=1)
        self.report = {"mode": "dry" if dry else "gpu", "started_utc": _utc(),
                       "repo_commit": _git_commit(), "budget_s": self.deadline - self.started,
                       "sections": {}}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + ([str(site)] if site.is_dir() else []) +
            [p for p in [os.environ.get("PYTHONPATH")] if p])
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(key, None)   # each child is its own one-process run

    # -- plumbing ------------------------------------------------------------------------
    def say(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.started:6.1f}s]"
        print(f"gpu-check {stamp} {line}", flush=True)
        self.log.write(f"{stamp} {line}\n")

    def remaining(self) -> float:
        return self.section_deadline - time.monotonic()

    def run(self, cmd: list[str], *, cwd: Path | None = None, check: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """A child process within the section's time; its output goes to the log."""
        limit = self.remaining() if timeout is None else min(timeout, self.remaining())
        if limit <= 1:
            raise TimeoutError("no time left in this section's budget")
        self.log.write(f"$ {' '.join(cmd)}\n")
        # Its own process group, so that a timeout ends whatever it started too (compilers,
        # checkpoint writers).
        child = subprocess.Popen(cmd, cwd=cwd or REPO, env=self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = child.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            self.log.write(stdout + stderr)
            raise TimeoutError(f"timed out after {limit:.0f} s: {' '.join(cmd[:4])} ...") \
                from None
        proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
        self.log.write(proc.stdout + proc.stderr + f"(exit {proc.returncode})\n")
        if check and proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:4])} ...: "
                               f"{_last_error(proc.stderr)}")
        return proc

    def probe(self, name: str, *args: str, timeout: float | None = None) -> dict:
        """``tools/gpu_probes.py NAME`` in a child process: the JSON object it prints last."""
        proc = self.run([self.python, str(PROBES_SCRIPT), name, *args], timeout=timeout)
        return _last_json(proc.stdout)

    def train(self, profile: str, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
        cmd = [self.python, str(REPO / "launch" / "train.py"), "--profile", profile]
        for item in sets:
            cmd += ["--set", item]
        return self.run(cmd + list(extra))

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / (REPORT + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(self.out / REPORT)

    def section(self, name: str, body) -> None:
        budget = (DRY_BUDGETS if self.dry else BUDGETS)[name]
        start = time.monotonic()
        self.section_deadline = min(self.deadline, start + budget)
        record = {"budget_s": budget}
        if self.deadline - start < 5:
            record.update(status="skipped", reason="the overall time budget is spent")
        else:
            self.say(f"{name}: start (budget {budget} s)")
            try:
                record.update(body(self) or {})
                record["status"] = "passed"
            except SectionSkipped as exc:
                record.update(status="skipped", reason=str(exc))
            except Exception as exc:   # isolation: record it, go on with the next section
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                self.log.write(traceback.format_exc())
        record["seconds"] = round(time.monotonic() - start, 1)
        self.report["sections"][name] = record
        self.say(f"{name}: {record['status']} in {record['seconds']} s"
                 + (f" ({record.get('error') or record.get('reason')})"
                    if record["status"] != "passed" else ""))
        self.save()


# -- sections ------------------------------------------------------------------------------
def install(c: Check) -> dict:
    """The carried wheels into ``c.site`` (on PYTHONPATH of every child): nothing is fetched,
    nothing the image has is replaced, and a second run finds them installed already."""
    if c.dry:
        raise SectionSkipped("dry run: the local virtual environment has everything")
    wheels = sorted(c.wheels.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"no wheels in {c.wheels}: run `make gpu-check` here first and carry "
                           f"{c.wheels.name}")
    c.run([c.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(c.site)] + [str(w) for w in wheels])
    c.env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(c.site)] + [
        p for p in [os.environ.get("PYTHONPATH")] if p])
    versions = c.probe("versions")
    missing = [k for k in ("megatron-core", "deepspeed") if not versions.get(k)]
    if missing:
        raise RuntimeError(f"installed, but not importable: {', '.join(missing)}")
    return {"wheels": [w.name for w in wheels], "site": str(c.site), "versions": versions}


def environment(c: Check) -> dict:
    return c.probe("environment")


def kernels(c: Check) -> dict:
    """The hook for fused kernels: every ``kernels/<name>/check.py`` is run (``--dry`` in the
    dry run); it builds its kernel from source, compares it with the eager module it replaces
    and times both, printing one JSON object as its last stdout line (e.g. ``max_abs_err``,
    ``passed``, ``ms``, ``eager_ms``, ``gb_per_s``). A check that exits non-zero or prints
    ``"passed": false`` fails the section; the others still run."""
    checks = sorted(REPO.glob("kernels/*/check.py"))
    if not checks:
        raise SectionSkipped("no kernels/*/check.py yet")
    # Build every kernel first, side by side (python -m apt.kernels): one after the other, the
    # CUDA bindings alone would take most of the section's minute. The later sections' models
    # (model.kernels: auto) then find them built in TORCH_EXTENSIONS_DIR.
    build = c.run([c.python, "-m", "apt.kernels"] + ([] if c.dry else ["--jobs", "3"]))
    results, failed = {"build": build.stdout.strip().splitlines()}, []
    for path in checks:
        name = path.parent.name
        try:
            proc = c.run([c.python, str(path)] + (["--dry"] if c.dry else []))
            results[name] = _last_json(proc.stdout)
            if results[name].get("passed") is False:
                failed.append(name)
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
    if failed:
        raise RuntimeError(f"kernels failed: {', '.join(failed)}; results {results}")
    return {"kernels": results}


def train_125m(c: Check) -> dict:
    """Benchmark mode on the 125m profile in bf16 (the tiny one in fp32 in the dry run), with
    Megatron's local layer spec, and with Transformer Engine's when it is installed."""
    if c.dry:
        profile, sets, steps, warmup = "tiny", DRY_MODEL + ["training.batch_size=8"], 3, 1
    else:   # a 64 x 2048 token step (8 micro-batches of 8): ~0.5 s on one H100/H200
        profile, sets, steps, warmup = "125m", ["training.precision=bf16",
                                                "training.batch_size=64",
                                                "training.micro_batch_size=8"], 50, 5
    sets = sets + [f"output.dir={c.work / 'train_125m'}"]
    specs = {"local": c.probe("benchmark", "--spec", "local", "--profile", profile,
                              "--steps", str(steps), "--warmup", str(warmup), *_sets(sets))}
    if specs["local"].get("transformer_engine_installed"):
        try:
            specs["transformer_engine"] = c.probe(
                "benchmark", "--spec", "transformer_engine", "--profile", profile,
                "--steps", str(steps), "--warmup", str(warmup), *_sets(sets))
        except Exception as exc:
            specs["transformer_engine"] = {"error": f"{type(exc).__name__}: {exc}"}
    local = specs["local"]
    return {"profile": profile, "precision": local["precision"], "steps": local["steps"],
            "tokens_per_s": local["tokens_per_s"], "mfu": local["mfu"], "specs": specs}


def micro_batch_1b(c: Check) -> dict:
    """The 1b profile (Llama-3.2-1B shape, 4096 tokens a row): micro-batch 1, 2, 4, ... until
    one runs out of memory or the budget ends; each try is its own process (a clean device)."""
    if c.dry:
        profile, sets, tries = "tiny", list(DRY_MODEL), [1, 2]
    else:
        profile, sets, tries = "1b", ["training.precision=bf16"], [1, 2, 4, 8, 16, 32, 64]
    results, largest, last_took = [], None, 0.0
    for micro in tries:
        if c.remaining() < 1.5 * last_took + 5:
            break   # the next (larger) try would not finish in time
        start = time.monotonic()
        try:
            result = c.probe("benchmark", "--spec", "local", "--profile", profile, "--steps",
                             "3", "--warmup", "1", "--oom-ok", *_sets(sets + [
                                 f"training.micro_batch_size={micro}",
                                 f"training.batch_size={micro}",
                                 f"output.dir={c.work / 'micro_batch_1b'}"]))
        except Exception as exc:   # keep what fitted so far
            results.append({"micro_batch": micro, "error": f"{type(exc).__name__}: {exc}"})
            break
        last_took = time.monotonic() - start
        results.append({"micro_batch": micro, **{k: result.get(k) for k in (
            "oom", "tokens_per_s", "mfu", "step_time_s", "mem_peak_allocated_gib",
            "mem_rss_gib") if k in result}})
        if result.get("oom"):
            break
        largest = results[-1]
    if largest is None:
        raise RuntimeError(f"no micro-batch fits: {results}")
    mfu = largest["mfu"]
    return {"profile": profile, "largest_micro_batch": largest["micro_batch"],
            "stopped_by": "out of memory" if results[-1].get("oom") else
            "an error" if "error" in results[-1] else
            ("the tries' end" if len(results) == len(tries) else "the time budget"),
            "tokens_per_s": largest["tokens_per_s"], "mfu": mfu, "anchor_mfu": ANCHOR_MFU,
            "mfu_vs_anchor_low": mfu / ANCHOR_MFU["low"], "tries": results}


def fp16_resume(c: Check) -> dict:
    """Train 2N steps with a checkpoint at N; resume from it (a new process, launch/train.py
    --resume) and compare steps N+1..2N: losses and dynamic loss scales bit for bit, and the
    scaler's whole state (scale and counters) in the checkpoint at 2N. fp16 is GPU only: the
    dry run does the same in fp32 (the loss scale is then 1.0, no scaler state)."""
    out = c.work / "fp16_resume"
    shutil.rmtree(out, ignore_errors=True)
    if c.dry:
        profile, sets, precision = "tiny", DRY_MODEL + ["training.batch_size=8"], "fp32"
    else:
        profile, precision, sets = "125m", "fp16", list(GPU_SMALL)
    n = 4
    sets = sets + QUIET + [f"training.precision={precision}", f"training.max_steps={2 * n}",
                           "training.warmup_steps=2", "training.log_interval=1",
                           f"training.checkpoints.save_interval={n}", f"output.dir={out}"]
    c.train(profile, sets)
    (run,) = [Path(p).parent for p in glob.glob(str(out / "*" / "metrics.jsonl"))]
    first = _steps(run / "metrics.jsonl")
    checkpoint = out / f"{profile}-checkpoints" / f"checkpoint-{n}"
    saved = json.loads((checkpoint / "state.json").read_text())
    # The scaler's counters (steps since the last overflow, hysteresis) decide its next change;
    # a resume that restored only the scale would end with other counters in checkpoint-2N.
    last = checkpoint.parent / f"checkpoint-{2 * n}" / "state.json"
    scalers_first = json.loads(last.read_text()).get("loss_scalers")
    c.train(profile, sets, "--resume", str(checkpoint))
    second = _steps(run / "metrics.jsonl")   # the resumed run continues in the same directory
    scalers_resumed = json.loads(last.read_text()).get("loss_scalers")   # saved again by it
    compared = list(range(n + 1, 2 * n + 1))
    diffs = {s: abs(first[s]["loss"] - second[s]["loss"]) for s in compared}
    identical = scalers_first == scalers_resumed and all(
        first[s]["loss"] == second[s]["loss"] and
        first[s].get("loss_scale") == second[s].get("loss_scale") for s in compared)
    scales = [first[s].get("loss_scale") for s in sorted(first)]
    result = {"precision": precision, "steps": 2 * n, "resumed_at": n,
              "bit_identical": identical, "max_abs_loss_diff": max(diffs.values()),
              "losses_first": [first[s]["loss"] for s in compared],
              "losses_resumed": [second[s]["loss"] for s in compared],
              "loss_scales_first": [first[s].get("loss_scale") for s in compared],
              "loss_scales_resumed": [second[s].get("loss_scale") for s in compared],
              "loss_scale_at_checkpoint": first[n].get("loss_scale"),
              "loss_scale_changed_before_checkpoint": len(set(scales[:n])) > 1,
              "checkpoint_loss_scalers": saved.get("loss_scalers"),
              "final_loss_scalers_first": scalers_first,
              "final_loss_scalers_resumed": scalers_resumed}
    if not identical:
        raise RuntimeError(f"resumed losses differ (max {result['max_abs_loss_diff']:.3g}): "
                           f"{result}")
    return result


def async_checkpoint(c: Check) -> dict:
    args = (["--hidden", "64", "--layers", "2"] if c.dry else ["--hidden", "768", "--layers", "12"])
    return c.probe("async_checkpoint", *args, "--dir", str(c.work / "async_checkpoint"))


def eval_export(c: Check) -> dict:
    """The weights trained by fp16_resume (or a short run of its own when that section left
    none): evaluation on the held-out split, export-hf, transformers' logits against APT's."""
    runs = [Path(p).parents[2] for p in glob.glob(str(c.work / "fp16_resume" / "*" / "model" /
                                                          "dist" / "metadata.json"))]
    sets = DRY_MODEL + ["training.batch_size=8"] if c.dry else list(GPU_SMALL)
    profile = "tiny" if c.dry else "125m"
    if not runs:
        out = c.work / "eval_export"
        shutil.rmtree(out, ignore_errors=True)
        c.train(profile, sets + QUIET + ["training.max_steps=4", "training.warmup_steps=2",
                                         "training.checkpoints.save_interval=0",
                                         f"output.dir={out}"])
        runs = [Path(p).parents[2] for p in glob.glob(str(out / "*" / "model" / "dist" /
                                                          "metadata.json"))]
    (run,) = runs
    return c.probe("eval_export", "--run", str(run), "--profile", profile, *_sets(sets),
                   "--out", str(c.work / "hf"))


SECTIONS = [("install", install), ("environment", environment), ("kernels", kernels),
            ("train_125m", train_125m), ("micro_batch_1b", micro_batch_1b),
            ("fp16_resume", fp16_resume), ("async_checkpoint", async_checkpoint),
            ("eval_export", eval_export)]


# -- helpers -------------------------------------------------------------------------------
def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _steps(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())
            if "loss" in r and "step" in r}


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in the output: {stdout[-300:]!r}")


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["(no output)"])[-1][:400]


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="on CPU: tiny model, few steps")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu-check-out"))
    parser.add_argument("--work", default=None, help="scratch (runs, checkpoints); default: a "
                        "temporary directory, removed at the end")
    parser.add_argument("--wheels", default=str(REPO / ".gpu-wheels"))
    parser.add_argument("--site", default="/tmp/apt-gpu-site", help="where the wheels install")
    parser.add_argument("--only", default=None, help="comma-separated sections (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (REPORT, LOG):
        (out / name).unlink(missing_ok=True)
    work = Path(args.work) if args.work else Path(
        __import__("tempfile").mkdtemp(prefix="apt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, work, args.dry, Path(args.wheels), Path(args.site))
    only = set(args.only.split(",")) if args.only else None
    check.say(f"{check.report['mode']} run, report {out / REPORT}, scratch {work}")
    try:
        for name, body in SECTIONS:
            if only is None or name in only:
                check.section(name, body)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    statuses = {n: r["status"] for n, r in check.report["sections"].items()}
    check.report["summary"] = statuses
    check.save()
    check.say("done: " + ", ".join(f"{n} {s}" for n, s in statuses.items()))
    return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
