"""tools/gpu_check.sh, the one call a lent GPU gets, kept from rotting on CPU:

- its dry run (`make gpu-check DRY=1`: the same sections on a tiny model, few steps) passes
  every section that can run here and fills the report's fields: environment, benchmark
  tokens/s and MFU, the micro-batch search, a resumed run's losses bit-identical to the
  uninterrupted run's, the asynchronous save's stall below a synchronous save, evaluation and
  an HF export whose logits match APT's;
- a section that raises or outlives its budget is recorded as failed with its error and the
  next section still runs (in-process, no child training).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_fills_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["APT_PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1300)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    sections = report["sections"]
    assert report["mode"] == "dry" and list(sections) == [
        "install", "environment", "kernels", "train_125m", "micro_batch_1b", "fp16_resume",
        "async_checkpoint", "eval_export"]
    assert sections["install"]["status"] == "skipped"   # the venv has everything here
    kernels = sorted(REPO.glob("kernels/*/check.py"))
    assert sections["kernels"]["status"] == ("passed" if kernels else "skipped")
    for name, record in sections.items():
        if name not in ("install", "kernels"):
            assert record["status"] == "passed", (name, record)

    env_ = sections["environment"]
    assert env_["torch"] and env_["python"] and env_["matmul"]["tflops"] > 0
    # the rates calibration takes besides the GEMM (apt/trainops/perf/calibration.py)
    assert env_["hbm"]["gbs"] > 0 and env_["attention"]["tflops"] > 0
    assert env_["versions"]["megatron-core"] and env_["versions"]["deepspeed"]

    train = sections["train_125m"]
    assert train["precision"] == "fp32" and train["steps"] == 3
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1
    assert train["specs"]["local"]["spec"] == "local"

    mb = sections["micro_batch_1b"]
    assert mb["largest_micro_batch"] == 2 and [t["micro_batch"] for t in mb["tries"]] == [1, 2]
    assert mb["tokens_per_s"] > 0 and mb["anchor_mfu"]["low"] == 0.41

    resume = sections["fp16_resume"]
    assert resume["bit_identical"] is True and resume["max_abs_loss_diff"] == 0
    assert resume["losses_first"] == resume["losses_resumed"] and len(resume["losses_first"]) == 4
    assert resume["final_loss_scalers_first"] == resume["final_loss_scalers_resumed"]

    ckpt = sections["async_checkpoint"]
    assert ckpt["checkpoint_mib"] > 0 and ckpt["device"] == "cpu"
    assert 0 < ckpt["async_stall_s"] < ckpt["sync_save_s"]

    ev = sections["eval_export"]
    assert math.isfinite(ev["val_loss"]) and ev["val_perplexity"] > 1
    assert "model.safetensors" in ev["hf_files"] and ev["hf_max_logit_diff"] < 1e-3
    assert report["summary"] == {n: r["status"] for n, r in sections.items()}


def test_a_failing_or_overrunning_section_is_recorded_and_the_next_runs(tmp_path):
    gc = _gpu_check()
    check = gc.Check(tmp_path, tmp_path / "work", dry=True, wheels=tmp_path / "none",
                     site=tmp_path / "site")
    gc.DRY_BUDGETS.update(broken=10, slow=2, fine=10)

    def broken(c):
        raise ValueError("a broken section")

    def slow(c):
        c.run(["sleep", "30"])

    check.section("broken", broken)
    start = time.monotonic()
    check.section("slow", slow)
    assert time.monotonic() - start < 10   # killed at its budget, not after 30 s
    check.section("fine", lambda c: {"value": 1})
    report = json.loads((tmp_path / gc.REPORT).read_text())["sections"]
    assert report["broken"]["status"] == "failed"
    assert report["broken"]["error"] == "ValueError: a broken section"
    assert report["slow"]["status"] == "failed" and "timed out" in report["slow"]["error"]
    assert report["fine"] == {"budget_s": 10, "value": 1, "status": "passed",
                              "seconds": report["fine"]["seconds"]}
