"""Model FLOPs per token, device peak FLOP/s, and MFU.

What is counted (``training_flops_per_token``), per token of a training step:

* Dense matmuls: ``6 * N_matmul``. ``N_matmul`` counts every weight that multiplies the token's
  activations: per layer q, k, v, out projections, the SwiGLU gate/up/down of the experts the
  token is routed to (top-k for MoE) and the router, times ``num_layers``, plus the output
  projection ``V x h`` (a matmul even when tied to the embedding). Not counted: the input
  embedding (a lookup, not a matmul), norms, RoPE, softmax, residual adds (O(h), negligible).
  A forward pass costs 2 FLOPs per weight (multiply + add); backward costs twice the forward
  (gradients w.r.t. activations and w.r.t. weights), hence 2 + 4 = 6.
* Attention scores: forward ``Q K^T`` and ``A V`` cost ``2 * s * h`` FLOPs each per token per
  layer when all ``s`` keys are used; a causal mask uses ``s / 2`` keys on average, so forward
  is ``2 * s * h`` per layer, and training (3x forward) ``6 * L * s * h``.
* Activation recompute is NOT counted: MFU measures the model's useful FLOPs (PaLM, appendix B);
  recompute adds hardware work (one more forward with ``full``) that would make it HFU.

MFU = (tokens/s over all ranks) x (FLOPs per token) / (peak FLOP/s per device x devices).
"""
from __future__ import annotations

import time

import torch

from apt.core.config import ModelConfig
from apt.core.config.sizing import attention_widths, matmul_parameters

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, by precision.
# fp32 means TF32 tensor cores (what torch uses for fp32 matmuls when allowed). Matched by
# substring of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),    # SXM
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 1100.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),  # no bf16 tensor cores
]


def training_flops_per_token(m: ModelConfig, seq_length: int) -> float:
    """6 * N_matmul + 6 * L * s * q (causal attention; q = heads x head dimension, the hidden
    size unless head_dim differs), forward + backward, no recompute."""
    q_dim = attention_widths(m)[0]
    return 6.0 * matmul_parameters(m) + 6.0 * m.num_layers * seq_length * q_dim


def table_peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of a known GPU at ``precision`` (bf16 | fp16 | fp32), else None."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            value = peaks.get(precision) or peaks.get("bf16")
            return value * 1e12 if value else None
    return None


_MEASURED: dict = {}


def measure_matmul_flops(size: int = 1024, repeats: int = 5, dtype=torch.float32,
                         device: str = "cpu") -> float:
    """Best of ``repeats`` timed ``size x size`` matmuls, in FLOP/s (cached per process)."""
    key = (size, dtype, device)
    if key not in _MEASURED:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        # On CPU the GEMM the model's linear layers run: oneDNN's where it takes fp32
        # (apt/kernels/linear.py), faster than MKL's on AMD CPUs; with MKL's as the peak the
        # utilisation read above 1.
        from apt.kernels.linear import onednn_linear, supported
        matmul = ((lambda: onednn_linear(a, b, None)) if device == "cpu" and supported(a, b)
                  else (lambda: a @ b))
        matmul()  # warm-up: thread pool start, kernel selection
        best = float("inf")
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            matmul()
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        _MEASURED[key] = 2.0 * size ** 3 / best
    return _MEASURED[key]


def device_peak_flops(precision: str, configured_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from).

    Order: the configured ``hardware.peak_tflops``; the table for a known GPU; a measured matmul
    (unknown GPU, or CPU, where no data-sheet number means anything for a shared host)."""
    if configured_tflops:
        return configured_tflops * 1e12, "configured"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = table_peak_flops(name, precision)
        if peak:
            return peak, f"table ({name}, {precision})"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        return measure_matmul_flops(4096, dtype=dtype, device="cuda"), f"measured ({name})"
    return measure_matmul_flops(), "measured (CPU fp32 matmul, 1024^3)"


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float,
        num_devices: int) -> float:
    """Model FLOPs utilisation, a fraction of the devices' peak."""
    return tokens_per_s * flops_per_token / (peak_flops_per_device * num_devices)
