"""The machine a prediction is for: one GPU's peaks and links, and the software constants.

Loaded from ``hardware.yaml`` (one data file, each number with its source). A CPU "cluster"
(bench/perf_model_cpu.py) or a calibration (calibration.py) builds a Hardware from measured
rates instead: the same model then predicts what was measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import yaml

from apt.core.config import ConfigError

DATA_FILE = Path(__file__).with_name("hardware.yaml")


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: dict                # dtype -> dense FLOP/s
    hbm_bytes_s: float
    nvlink_bytes_s: float           # one direction, per GPU
    network_bytes_s: float          # one GPU's NIC
    nvlink_domain: int              # GPUs joined by NVLink (a node, or an NVL72 rack)
    sms: int | None                 # None: no wave quantization (CPU)
    gemm_fraction: float            # best measured GEMM rate / peak
    attention_fraction: float
    hbm_fraction: float
    collective_fraction: float
    latency_s: dict = field(default_factory=lambda: {"nvlink": 0.0, "network": 0.0})
    gemm_tile: tuple = (128, 256)
    comm_sms: int = 0               # SMs a running collective occupies (overlap contention)
    # Framework time on the host (Python, autograd, Megatron's module code, op dispatch), per
    # layer and micro-batch (forward + backward) and per step (loop, optimizer calls, logging).
    # A GPU runs it ahead of the device, asynchronously: it costs only where it exceeds the
    # device's time. A CPU is its own device: the two add up (host_serial).
    host_layer_s: float = 0.0
    host_step_s: float = 0.0
    host_serial: bool = False
    memory_gib: float = 80.0
    source: str = ""
    # FlashAttention-1-era kernels, causal: {head_dim: [TFLOP/s at each of flash1_seqs]};
    # None: no published figure for this GPU
    flash1_causal_tflops: dict | None = None
    flash1_seqs: tuple = ()

    def attention_rate_fraction(self, kernel: str, head_dim: int = 128, seq: int = 2048
                                ) -> float:
        """Fraction of the dense peak a fused attention kernel of this generation reaches:
        "flash" (FlashAttention-2/3, today's kernels) or "flash1" (FlashAttention-1 and its
        Triton port, as 2022-23 software ran them, measured at the row's own setting)."""
        if kernel == "flash":
            return self.attention_fraction
        if not self.flash1_causal_tflops:
            raise ConfigError(f"{self.name} has no flash1_causal_tflops in {DATA_FILE.name} "
                              f"(no published FlashAttention-1 figure for it)")
        return self.flash1_causal_tflops_at(head_dim, seq) * 1e12 / self.peak("bf16")

    def flash1_causal_tflops_at(self, head_dim: int, seq: int) -> float:
        """Useful TFLOP/s of a FlashAttention-1-era causal kernel: the figure's bars at the
        smallest measured head dimension that holds ``head_dim`` (both kernels pad the head to
        their block, 64 or 128: flash_attn_triton.py's BLOCK_HEADDIM = next power of 2; so
        head_dim 112 runs the 128 kernel and keeps 112/128 of its FLOP/s), interpolated in
        log2(seq) between the measured lengths and held at the ends."""
        dims = sorted(int(d) for d in self.flash1_causal_tflops)
        block = next((d for d in dims if d >= head_dim), None)
        if block is None:
            raise ConfigError(f"head_dim {head_dim} is over FlashAttention-1's largest "
                              f"({dims[-1]}) in {DATA_FILE.name}")
        bars = self.flash1_causal_tflops[block]
        x = [math.log2(s) for s in self.flash1_seqs]
        t = min(max(math.log2(seq), x[0]), x[-1])
        i = max(0, min(len(x) - 2, next(j for j in range(len(x) - 1) if t <= x[j + 1])))
        rate = bars[i] + (bars[i + 1] - bars[i]) * (t - x[i]) / (x[i + 1] - x[i])
        return rate * head_dim / block

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ConfigError(f"{self.name} has no {dtype} peak in {DATA_FILE.name}; known: "
                              f"{', '.join(sorted(self.peak_flops))}")
        return self.peak_flops[dtype]

    def with_gemm_rate(self, dtype: str, flops: float, shape_efficiency: float) -> "Hardware":
        """This GPU with its GEMM fraction taken from a measured rate (calibration): the
        measured shape's own quantization loss is divided out."""
        return replace(self, gemm_fraction=flops / (self.peak(dtype) * shape_efficiency))


@lru_cache(maxsize=1)
def _data() -> dict:
    return yaml.safe_load(DATA_FILE.read_text())


def gpu_names() -> list[str]:
    return sorted(_data()["gpus"])


def reliability() -> dict:
    return dict(_data()["reliability"])


def load_hardware(name: str) -> Hardware:
    data = _data()
    gpus, k = data["gpus"], data["kernels"]
    if name not in gpus:
        raise ConfigError(f"unknown GPU '{name}' (--gpu); known: {', '.join(gpu_names())}")
    g = gpus[name]
    return Hardware(
        name=name, peak_flops={d: v * 1e12 for d, v in g["peak_tflops"].items()},
        hbm_bytes_s=g["hbm_gbs"] * 1e9, nvlink_bytes_s=g["nvlink_gbs"] * 1e9,
        network_bytes_s=g["network_gbs"] * 1e9, nvlink_domain=g["nvlink_domain"],
        sms=g["sms"], gemm_fraction=g["gemm_fraction"],
        attention_fraction=k["attention_fraction"], hbm_fraction=k["hbm_fraction"],
        collective_fraction=k["collective_fraction"], latency_s=dict(k["collective_latency_s"]),
        gemm_tile=tuple(k["gemm_tile"]), comm_sms=k["comm_sms"], memory_gib=g["memory_gib"],
        source=g["source"], flash1_causal_tflops=g.get("flash1_causal_tflops"),
        flash1_seqs=tuple(k["flash1_seqs"]))


def gpu_for_device_name(device_name: str) -> str | None:
    """The hardware.yaml key of a torch.cuda device name (calibration files), else None."""
    n = device_name.lower()
    for key, name in (("h200", "h200"), ("h100", "h100-sxm"), ("b200", "b200"),
                      ("a100-sxm4-40", "a100-40g"), ("a100", "a100-80g")):
        if key in n:
            return name
    return None
