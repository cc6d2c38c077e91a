"""Calibration from a measurement: tools/gpu_check.py's report (gpu_check.json).

The report's ``environment`` section names the GPU and times a square BF16 GEMM
(``matmul: {n, dtype, tflops}``), a large device-memory copy (``hbm: {bytes, gbs}``) and causal
attention forward + backward (``attention: {..., dtype, tflops}``); its ``train_125m`` section
times training steps of a profile on that one GPU (``specs.local``: step_time_s, micro_batch,
grad_accum, tokens_per_step, precision). The measured rates replace the data file's GEMM,
HBM and attention fractions (the GEMM shape's own quantization divided out; reports from
before the copy and attention probes keep the data file's for those), the model predicts the
measured step, and the error is reported: what to expect of its other predictions there.
Collective bandwidths need two GPUs or more and stay the data file's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from apt.core.config import ConfigError, load_profile
from apt.trainops.distributed.plan import make_plan
from .compute import gemm_shape_efficiency
from .hardware import Hardware, gpu_for_device_name, load_hardware
from .predict import Prediction, predict
from .shape import layout_from_plan, shape_from_config

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "tf32"}


@dataclass(frozen=True)
class Calibration:
    hardware: Hardware
    measured_gemm_tflops: float
    profile: str
    measured_step_s: float
    prediction: Prediction
    uncalibrated_step_s: float
    measured: dict = field(default_factory=dict)   # the other measured rates, for the line

    @property
    def error(self) -> float:
        return self.prediction.step_s / self.measured_step_s - 1

    def describe(self) -> str:
        hw = self.hardware
        others = "".join(f", {k} {v}" for k, v in self.measured.items())
        fractions = (f" (HBM {hw.hbm_fraction:.3f}, attention {hw.attention_fraction:.3f})"
                     if self.measured else "")
        return (f"calibration  {hw.name}: measured GEMM {self.measured_gemm_tflops:.0f}"
                f" TFLOP/s{others} -> GEMM fraction {hw.gemm_fraction:.3f}{fractions}; "
                f"{self.profile} "
                f"step measured {self.measured_step_s * 1000:.1f} ms, predicted "
                f"{self.prediction.step_s * 1000:.1f} ms ({self.error:+.1%}; with the data file's "
                f"constants {self.uncalibrated_step_s * 1000:.1f} ms)")


def _get(data, path: str, where: str):
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            raise ConfigError(f"{where}: no '{path}' (expected tools/gpu_check.py's report)")
        data = data[key]
    return data


def calibrate(path: str | Path) -> Calibration:
    where = str(path)
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read a JSON report ({exc})") from None
    env = _get(report, "sections.environment", where)
    gpu = gpu_for_device_name(str(_get(env, "gpu", where)))
    if gpu is None:
        raise ConfigError(f"{where}: GPU '{env['gpu']}' is not in hardware.yaml")
    matmul = _get(env, "matmul", where)
    dtype = DTYPES.get(str(matmul.get("dtype")))
    n, tflops = matmul.get("n"), matmul.get("tflops")
    if dtype is None or not isinstance(n, int) or not isinstance(tflops, (int, float)) \
            or n <= 0 or tflops <= 0:
        raise ConfigError(f"{where}: sections.environment.matmul needs n > 0, tflops > 0 and a "
                          f"dtype in {sorted(DTYPES)}")
    base = load_hardware(gpu)
    hw = base.with_gemm_rate(dtype, tflops * 1e12, gemm_shape_efficiency(n, n, base))
    measured = {}
    if "hbm" in env:
        gbs = _positive(env["hbm"], "gbs", f"{where}: sections.environment.hbm")
        hw = replace(hw, hbm_fraction=gbs * 1e9 / hw.hbm_bytes_s)
        measured["HBM copy"] = f"{gbs:,.0f} GB/s"
    if "attention" in env:
        att = env["attention"]
        rate = _positive(att, "tflops", f"{where}: sections.environment.attention")
        att_dtype = DTYPES.get(str(att.get("dtype")))
        if att_dtype is None:
            raise ConfigError(f"{where}: sections.environment.attention needs a dtype in "
                              f"{sorted(DTYPES)}")
        hw = replace(hw, attention_fraction=rate * 1e12 / hw.peak(att_dtype))
        measured["attention"] = f"{rate:,.0f} TFLOP/s"
    train = _get(report, "sections.train_125m", where)
    local = _get(train, "specs.local", where)
    try:
        micro, accum = int(local["micro_batch"]), int(local["grad_accum"])
        step_s = float(local["step_time_s"])
        sets = [f"training.batch_size={micro * accum}", f"training.micro_batch_size={micro}",
                f"training.precision={local['precision']}"]
        cfg = load_profile(str(train["profile"]), sets)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: sections.train_125m.specs.local is incomplete ({exc})") \
            from None
    plan = make_plan(cfg, 1, 1, device_type="cuda")
    shape, layout = shape_from_config(cfg.model, cfg.data.seq_length), layout_from_plan(plan)
    # Megatron's local layer spec (what train_125m runs) has no fused attention kernel.
    fused = train.get("spec", "local") != "local"
    return Calibration(hardware=hw, measured_gemm_tflops=float(tflops), profile=cfg.name,
                       measured_step_s=step_s, prediction=predict(shape, layout, hw, fused),
                       uncalibrated_step_s=predict(shape, layout, base, fused).step_s,
                       measured=measured)


def _positive(section, key: str, where: str) -> float:
    value = section.get(key) if isinstance(section, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}.{key}: needs a number > 0, got {value!r}")
    return float(value)
