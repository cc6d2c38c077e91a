"""The fused linear + cross-entropy (apt/kernels/linear_cross_entropy.py, kernels/linear_cross_entropy/):
the C++ kernel against an fp64 reference (loss and the gradients of hidden and weight) at
shapes whose tokens and vocabulary are no multiple of the blocks, in fp32 and bf16; under TP2
(2 processes, gloo) against Megatron's vocab-parallel cross-entropy; and the CUDA kernel
compiled for sm_80 and sm_90 without register spills."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from apt.kernels import load
from apt.kernels._build import CUDA_FLAGS, KERNEL_SOURCES
from apt.kernels.linear_cross_entropy import (block_shape, eager_linear_cross_entropy,
                                              linear_cross_entropy)
from tests._launch import run_distributed

WORKER = Path(__file__).parent / "workers" / "linear_ce_tp.py"
FUSED = "_FusedLinearCrossEntropyBackward"


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    """Built once here (about 40 s the first time in a run, then cached in
    TORCH_EXTENSIONS_DIR), so the TP workers below load it rather than build it twice."""
    return load("linear_cross_entropy", "cpu")


def data(n, hidden, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.rand(n, generator=g) + 0.5
    upstream[::4] = 0.0   # masked tokens
    return h, w, labels, upstream


def loss_and_grads(fn, h, w, labels, upstream):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss, h.grad, w.grad


def fp64(h, w, labels, upstream):
    return loss_and_grads(
        lambda hh, ww, y: torch.nn.functional.cross_entropy(hh @ ww.t(), y, reduction="none"),
        h.double(), w.double(), labels, upstream.double())


def scaled_err(got, ref):
    """Largest difference over the reference's largest magnitude (at least 1)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / max(1.0, float(ref.abs().max())))


# (tokens, hidden, vocab, chunk_tokens, chunk_vocab): odd sizes, blocks that do not divide
# them, a single row per block, a vocabulary split in slices, and the default block shape.
SHAPES = [(37, 16, 301, 8, 64), (50, 24, 517, 1, 100), (64, 32, 1000, 16, None),
          (129, 40, 2053, None, None)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64_and_eager(shape):
    n, hidden, vocab, chunk_tokens, chunk_vocab = shape
    h, w, labels, upstream = data(n, hidden, vocab, torch.float32)
    fused = loss_and_grads(lambda hh, ww, y: linear_cross_entropy(
        hh, ww, y, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab), h, w, labels, upstream)
    assert type(fused[0].grad_fn).__name__ == FUSED, "dispatch fell back to the eager path"
    assert fused[0].dtype == torch.float32 and fused[1].dtype == fused[2].dtype == torch.float32
    eager = loss_and_grads(eager_linear_cross_entropy, h, w, labels, upstream)
    ref = fp64(h, w, labels, upstream)
    for name, got, want, exact in zip(("loss", "grad hidden", "grad weight"), fused, eager, ref):
        assert scaled_err(got, want) <= 1e-5, f"{name}: fused vs eager fp32"
        assert scaled_err(got, exact) <= 1e-5, f"{name}: fused vs fp64"


@pytest.mark.parametrize("chunks", [(16, 128), (None, None)], ids=["blocks", "default"])
def test_bf16_matches_eager_and_fp64(chunks):
    """bf16 in, fp32 loss out. The fused op rounds logits to bf16 as the eager path does and
    then works in fp32, so its loss matches eager's closely; the gradients, bf16 in both,
    differ by bf16 rounding, and both are as far from the fp64 reference."""
    h, w, labels, upstream = data(45, 24, 700, torch.bfloat16, seed=1)
    fused = loss_and_grads(lambda hh, ww, y: linear_cross_entropy(
        hh, ww, y, chunk_tokens=chunks[0], chunk_vocab=chunks[1]), h, w, labels, upstream)
    assert type(fused[0].grad_fn).__name__ == FUSED
    assert fused[0].dtype == torch.float32 and fused[1].dtype == fused[2].dtype == torch.bfloat16
    eager = loss_and_grads(eager_linear_cross_entropy, h, w, labels, upstream)
    ref = fp64(h.float(), w.float(), labels, upstream)
    assert scaled_err(fused[0], eager[0]) <= 1e-5
    for name, got, want, exact in zip(("grad hidden", "grad weight"), fused[1:], eager[1:],
                                      ref[1:]):
        assert scaled_err(got, want) <= 1e-2, f"{name}: fused vs eager bf16"
        assert scaled_err(got, exact) <= 2 * scaled_err(want, exact) + 1e-2, \
            f"{name}: fused further from fp64 than eager bf16"


def test_tensor_parallel_matches_megatron_and_fp64(tmp_path):
    """TP2 and TP1 (2 processes): per-token loss, TP-summed hidden gradient and gathered weight
    gradient against Megatron's vocab_parallel_cross_entropy (fp32) and the fp64 reference."""
    out = tmp_path / "tp.json"
    run_distributed(WORKER, 2, ["--out", str(out)], timeout=240)
    results = json.loads(out.read_text())
    assert {r["tp"] for r in results} == {1, 2}
    for r in results:
        assert max(r["vs_megatron"]) <= 1e-5, r
        assert max(r["vs_fp64"]) <= 1e-5, r


def test_default_blocks_bound_the_logits():
    """The default block holds at most 2^22 logits on CPU, 2^25 on CUDA, whatever the sizes."""
    for tokens, vocab in [(4096, 32000), (4096, 128256), (8192, 128256), (7, 50)]:
        rows, cols = block_shape(tokens, vocab, "cpu")
        assert rows * cols <= max(1 << 22, 256 * 128) and rows <= tokens and cols <= vocab
        rows, cols = block_shape(tokens, vocab, "cuda")
        assert rows * cols <= 1 << 25 and cols <= vocab


def test_no_tokens_gives_zero_gradients():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.sum().backward()
    assert loss.shape == (0,) and h.grad.shape == (0, 8) and not w.grad.any()


def test_bad_inputs_are_refused():
    h, w, labels, _ = data(8, 16, 40, torch.float32)
    with pytest.raises(ValueError, match="shapes do not match"):
        linear_cross_entropy(h, w[:, :8], labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 40\)"):
        linear_cross_entropy(h, w, labels + 40)
    with pytest.raises(ValueError, match="one dtype"):
        linear_cross_entropy(h, w.double(), labels)


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit on this machine)")
def test_cuda_kernel_compiles_without_spills(tmp_path):
    """The .cu as the loader builds it (its flags, sm_80 and sm_90), with ptxas' report: every
    kernel instantiation for both targets, none spilling registers."""
    source = KERNEL_SOURCES / "linear_cross_entropy" / "linear_cross_entropy_cuda.cu"
    proc = subprocess.run(
        [_nvcc(), "-c", str(source), "-o", str(tmp_path / "lce.o"), "-std=c++17",
         "-Xptxas", "-v", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
         "-D__CUDA_NO_HALF_CONVERSIONS__", *CUDA_FLAGS],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stderr
    # 2 kernels x 3 dtypes x 2 load widths, per target
    for arch in ("sm_80", "sm_90"):
        entries = re.findall(rf"Compiling entry function '(\w+)' for '{arch}'", report)
        assert len(set(entries)) == 12, (arch, entries)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == 24 and all(s == ("0", "0") for s in spills), report


class _MatmulCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matmuls run under it (aten mm and addmm, in place or not)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm,
                                    torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_pass_with_the_loss_mask_matches_eager(dtype):
    """Given the weights it will be summed with (the loss mask), the kernel computes the
    gradient in its forward walk: backward then runs no matmul at all and matches eager. A
    backward weighing the tokens otherwise recomputes, and still matches."""
    n, hidden, vocab = 300, 24, 1500
    h, w, labels, _ = data(n, hidden, vocab, dtype, seed=2)
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for upstream, backward_matmuls in ((mask * 0.37, 0), (torch.rand(n) + 0.1, None)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, labels, weights=mask, chunk_tokens=64)
        with _MatmulCount() as counted:
            (loss * upstream).sum().backward()
        if backward_matmuls is not None:
            assert counted.count == backward_matmuls
        else:
            assert counted.count > 0   # recomputed
        eager = loss_and_grads(eager_linear_cross_entropy, h, w, labels, upstream)
        assert scaled_err(loss, eager[0]) <= 1e-5
        assert scaled_err(hh.grad, eager[1]) <= tol and scaled_err(ww.grad, eager[2]) <= tol
