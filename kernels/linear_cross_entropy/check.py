"""GPU check of the fused linear + cross-entropy (tools/gpu_check.py, section ``kernels``).

Builds the CUDA kernel from source, compares the fused op with the eager path (hidden @ W^T,
fp32 logits, cross-entropy) in fp32 and bf16 (loss and the gradients of hidden and weight, at
sizes no multiple of the blocks: default blocks, small ones that slice the vocabulary, and the
one-pass walk given per-token weights), then times forward + backward of each with CUDA
events and records the peak memory each allocates beyond its inputs
(torch.cuda.max_memory_allocated) at tokens 8192, hidden 4096, vocab 128256 in bf16. Prints
one JSON object as its last stdout line.

``--dry``: the same on CPU with the C++ kernel at a small shape (wall-clock times; no
allocator peak on CPU: bench/kernels_linear_ce.py measures CPU memory).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository's apt

import torch  # noqa: E402

from apt.kernels._measure import dtype_name, run_check  # noqa: E402

# fp32: GPU exp is ex2.approx (~2 ulp) and cuBLAS blocks the matmuls differently per shape;
# bf16: both paths round their gradients to bf16.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-3}


def make(n, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    upstream = (torch.rand(n, generator=g) + 0.5).to(device)
    return h, w, labels, upstream


def fwd_bwd(fn, h, w, labels, upstream):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(h, w, labels)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


def errs(got, ref):
    """(largest absolute difference, the same over the reference's largest magnitude >= 1)."""
    got, ref = got.double(), ref.double()
    worst = float((got - ref).abs().max())
    return worst, worst / max(1.0, float(ref.abs().max()))


def correctness(fused, eager, device, dry):
    errors, passed = {}, True
    shape, small = ((300, 64, 5003), (64, 1000)) if dry else ((1000, 256, 50257), (96, 2000))
    for dtype in (torch.float32, torch.bfloat16):
        # default blocks, small blocks that slice the vocabulary, and the one-pass walk (the
        # per-token weights given, and backward's gradient exactly upstream = 1 * weights)
        for case in ("default", "small", "one_pass"):
            h, w, labels, upstream = make(*shape, dtype, device)
            kw = ({"chunk_tokens": small[0], "chunk_vocab": small[1]} if case == "small" else
                  {"weights": upstream} if case == "one_pass" else {})
            got = fwd_bwd(lambda a, b, y: fused(a, b, y, **kw), h, w, labels, upstream)
            want = fwd_bwd(eager, h, w, labels, upstream)
            found = [errs(a, b) for a, b in zip(got, want)]
            key = f"{dtype_name(dtype)}_{case}"
            errors[key] = {name: [float(f"{e:.3g}") for e in pair] for name, pair in
                           zip(("loss", "grad_hidden", "grad_weight"), found)}
            scaled = [pair[1] for pair in found]
            passed &= scaled[0] <= LOSS_TOLERANCE[dtype] and max(scaled[1:]) <= TOLERANCE[dtype]
    return passed, errors


def measure(fn, args, device, repeats):
    """(ms per forward + backward, peak MiB allocated beyond the inputs)."""
    fwd_bwd(fn, *args)   # warm up (cuBLAS handles, autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fwd_bwd(fn, *args)   # nothing kept: one step's memory at a time
        end.record()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return start.elapsed_time(end) / repeats, peak
    start = time.perf_counter()
    for _ in range(repeats):
        fwd_bwd(fn, *args)
    return (time.perf_counter() - start) * 1000 / repeats, None


def check(device, dry: bool) -> dict:
    from apt.kernels.linear_cross_entropy import (eager_linear_cross_entropy,
                                                  linear_cross_entropy)

    def fused(h, w, y, **kw):
        loss = linear_cross_entropy(h, w, y, **kw)
        assert type(loss.grad_fn).__name__ == "_FusedLinearCrossEntropyBackward", \
            "the fused op did not run"
        return loss

    passed, errors = correctness(fused, eager_linear_cross_entropy, device, dry)
    shape = (256, 64, 4096) if dry else (8192, 4096, 128256)
    inputs = make(*shape, torch.bfloat16, device, seed=1)
    ms, peak = measure(fused, inputs, device, repeats=2 if dry else 3)
    one_pass_ms, one_pass_peak = measure(
        lambda h, w, y: fused(h, w, y, weights=inputs[3]), inputs, device,
        repeats=2 if dry else 3)
    eager_ms, eager_peak = measure(eager_linear_cross_entropy, inputs, device,
                                   repeats=2 if dry else 3)
    return {
        "passed": passed,
        "max_abs_err": max(pair[0] for e in errors.values() for pair in e.values()),
        "errors": errors,   # per case: [absolute, scaled by the reference's magnitude]
        "shape": {"tokens": shape[0], "hidden": shape[1], "vocab": shape[2],
                  "dtype": "bfloat16"},
        "ms": round(ms, 3), "eager_ms": round(eager_ms, 3),
        # the one-pass walk (the language-model objective's path when the vocabulary is not
        # split over TP): gradients in the forward, held until backward
        "one_pass_ms": round(one_pass_ms, 3),
        "one_pass_peak_mib": None if one_pass_peak is None else round(one_pass_peak, 1),
        "peak_mib": None if peak is None else round(peak, 1),
        "eager_peak_mib": None if eager_peak is None else round(eager_peak, 1),
        # both peaks include the gradients of hidden and weight, which both paths return
        "grads_mib": round((inputs[0].numel() + inputs[1].numel()) * 2 / 2 ** 20, 1),
    }


if __name__ == "__main__":
    sys.exit(run_check("linear_cross_entropy", __doc__.splitlines()[0], check))
