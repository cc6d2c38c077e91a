"""PerformanceMonitor: adds throughput, MFU, memory and loss scale to every step record.

The Trainer measures step time, tokens/s, data-loader wait, gradient norm and learning rate;
this callback derives per-device throughput and MFU (formula: apt/trainops/eval/flops.py) and
samples memory (CUDA allocated/reserved/peak, or the process RSS on CPU) once per log interval.
It runs first, so every backend and metrics.jsonl see the enriched records.
"""
from __future__ import annotations

import psutil
import torch

from apt.trainops.callbacks import Callback
from apt.trainops.eval.flops import device_peak_flops, mfu, training_flops_per_token

GIB = 2 ** 30


def memory_stats(device: torch.device | None = None) -> dict:
    """This process's memory in GiB: CUDA allocator numbers on a GPU, resident set on CPU."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
                "mem_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
                "mem_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB}
    return {"mem_rss_gib": psutil.Process().memory_info().rss / GIB}


def loss_scale(trainer) -> float:
    """The dynamic loss scale of DeepSpeed's fp16 optimizer; 1.0 when nothing scales the loss
    (fp32, bf16)."""
    optimizer = getattr(trainer.engine, "optimizer", None)
    for name in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, name, None)
        if isinstance(value, (int, float, torch.Tensor)):
            return float(value)
    return 1.0


class PerformanceMonitor(Callback):
    def on_train_start(self, trainer) -> None:
        cfg = trainer.config
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_length)
        self.peak_flops, self.peak_source = device_peak_flops(trainer.plan.precision,
                                                              cfg.hardware.peak_tflops)
        self.devices = trainer.runtime.world_size

    def on_log(self, trainer, records: list[dict]) -> None:
        memory, scale = memory_stats(trainer.runtime.device), loss_scale(trainer)
        for record in records:
            record["tokens_per_s_per_device"] = record["tokens_per_s"] / self.devices
            record["mfu"] = mfu(record["tokens_per_s"], self.flops_per_token, self.peak_flops,
                                self.devices)
            record["loss_scale"] = scale
            record.update(memory)

    def on_train_end(self, trainer, summary: dict) -> None:
        summary.update(flops_per_token=self.flops_per_token, peak_flops_per_device=self.peak_flops,
                       peak_flops_source=self.peak_source, devices=self.devices,
                       mfu=mfu(summary["tokens_per_s"], self.flops_per_token, self.peak_flops,
                               self.devices))
