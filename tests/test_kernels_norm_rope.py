"""Fused RMSNorm, RoPE and SwiGLU: the C++ CPU kernels against an fp64 reference of the eager
formula (forward and backward), the dispatch actually taking the fused path, and the CUDA
sources compiling for sm_80 / sm_90 without register spills (the kernels run on a lent GPU
only: kernels/<name>/check.py)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch

import apt.kernels.rmsnorm as rmsnorm_mod
import apt.kernels.rope as rope_mod
import apt.kernels.swiglu as swiglu_mod
from apt.kernels import _build, load
from apt.kernels.rmsnorm import eager_rms_norm, rms_norm
from apt.kernels.rope import apply_rope, eager_apply_rope
from apt.kernels.swiglu import eager_swiglu, swiglu

# Tolerances against fp64: fp32 math in the kernels, one rounding per stored value.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-3)}


@pytest.fixture(scope="module", autouse=True)
def _kernels_built():
    # Both CPU kernels build once per run (cached in TORCH_EXTENSIONS_DIR afterwards); a
    # machine where they cannot build fails here with the compiler's first line.
    if os.environ.get("APT_KERNELS") == "none":
        pytest.skip("APT_KERNELS=none")
    load("rmsnorm", "cpu")
    load("rope", "cpu")
    load("swiglu", "cpu")


def _fp64_grads(fn, inputs, grad):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    out.backward(grad.double())
    return out, [leaf.grad for leaf in leaves]


# -- RMSNorm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 33), (64, 1024)])
def test_rmsnorm_matches_fp64(dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1])).to(dtype).requires_grad_()
    y = rms_norm(x, w, 1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref, (dx, dw) = _fp64_grads(lambda a, b: eager_rms_norm(a, b, 1e-5), (x, w), grad)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    torch.testing.assert_close(x.grad.double(), dx, **TOL[dtype])
    # dweight sums over rows: its tolerance scales with the magnitude of the sum
    torch.testing.assert_close(w.grad.double(), dw, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * x[..., 0].numel())


# -- RoPE ------------------------------------------------------------------------------------
ROPE_CASES = {
    # (s, b, h, d, d_rot, freqs rows (1 or b), interleaved)
    "llama": (16, 2, 4, 64, 64, 1, False),
    "odd_heads_partial_rot": (9, 3, 7, 10, 6, 1, False),   # h=7, d=10 and d_rot=6: no vector width
    "per_row_freqs": (8, 3, 2, 16, 16, 3, False),          # packed documents: [s, b, 1, d]
    "interleaved_partial": (6, 2, 3, 24, 16, 2, True),
}


def _rope_inputs(s, b, h, d, d_rot, fb, dtype):
    # t as Megatron's QKV split leaves it: a non-contiguous view with a unit last stride
    qkv = torch.randn(s, b, h, 3 * d).to(dtype)
    t = qkv[..., d:2 * d].detach().requires_grad_()
    assert not t.is_contiguous()
    positions = (torch.arange(s, dtype=torch.float32).view(s, 1, 1, 1)
                 + 100 * torch.arange(fb).view(1, fb, 1, 1))   # per-row tables: other offsets
    inv = 1.0 / (10000 ** (torch.arange(0, d_rot // 2, dtype=torch.float32) * 2 / d_rot))
    freqs = positions * torch.cat([inv, inv]).view(1, 1, 1, d_rot)   # large angles too
    return t, freqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_fp64(dtype, case):
    torch.manual_seed(0)
    s, b, h, d, d_rot, fb, interleaved = ROPE_CASES[case]
    t, freqs = _rope_inputs(s, b, h, d, d_rot, fb, dtype)
    y = apply_rope(t, freqs, interleaved)
    grad = torch.randn(s, b, h, 2 * d).to(dtype)[..., :d]   # a strided incoming gradient too
    y.backward(grad)
    ref, (dt,) = _fp64_grads(lambda a: eager_apply_rope(a, freqs.double(), interleaved), (t,), grad)
    assert y.dtype == dtype and y.shape == t.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    torch.testing.assert_close(t.grad.double(), dt, **TOL[dtype])
    if d_rot < d:   # the pass-through channels are copied bit for bit
        assert torch.equal(y[..., d_rot:], t.detach()[..., d_rot:])


def test_rope_random_angles_per_channel():
    """The contract is per-channel angles (any table, not only Megatron's duplicated halves):
    the backward is the exact transpose."""
    torch.manual_seed(1)
    t = torch.randn(5, 2, 3, 8, dtype=torch.float64).float().requires_grad_()
    freqs = torch.randn(5, 2, 1, 8) * 4
    for interleaved in (False, True):
        t.grad = None
        y = apply_rope(t, freqs, interleaved)
        grad = torch.randn_like(y)
        y.backward(grad)
        ref, (dt,) = _fp64_grads(lambda a: eager_apply_rope(a, freqs.double(), interleaved),
                                 (t,), grad)
        torch.testing.assert_close(y.double(), ref, **TOL[torch.float32])
        torch.testing.assert_close(t.grad.double(), dt, **TOL[torch.float32])


# -- SwiGLU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 2), (2, 5, 66), (64, 1408), (7, 3, 1030)])
def test_swiglu_matches_fp64(dtype, shape):
    """Both halves' gradients land in their places of dy, over the vectorised body and the
    remainder of a row; large |a| (where sigmoid saturates) included."""
    torch.manual_seed(0)
    y = (torch.randn(*shape) * 4).to(dtype)
    y.view(-1)[:4] = torch.tensor([30.0, -30.0, 90.0, -90.0]).to(dtype)
    y.requires_grad_()
    out = swiglu(y)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, (dy,) = _fp64_grads(eager_swiglu, (y,), grad)
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2)
    # |out| reaches ~4 * 4 and more: the tolerance is relative to the value
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(y.grad.double(), dy, **TOL[dtype])


# -- dispatch --------------------------------------------------------------------------------
def _no_eager(*args, **kwargs):
    raise AssertionError("the eager path ran where the fused kernel should have")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_is_taken(monkeypatch, dtype):
    """With the eager functions disabled the public functions still work (forward and
    backward): the fused kernels ran. An input they do not take reaches eager."""
    monkeypatch.setattr(rmsnorm_mod, "eager_rms_norm", _no_eager)
    monkeypatch.setattr(rope_mod, "eager_apply_rope", _no_eager)
    monkeypatch.setattr(swiglu_mod, "eager_swiglu", _no_eager)
    x = torch.randn(4, 6, 64).to(dtype).requires_grad_()
    w = torch.ones(32, dtype=dtype, requires_grad=True)
    t, freqs = _rope_inputs(6, 4, 1, 32, 32, 1, dtype)
    out = apply_rope(rms_norm(swiglu(x), w, 1e-6).view(4, 6, 1, 32).transpose(0, 1), freqs)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None
    with pytest.raises(AssertionError, match="eager path ran"):
        rms_norm(x.detach().half(), w.detach().half(), 1e-6)   # no fp16 on CPU: eager
    with pytest.raises(AssertionError, match="eager path ran"):
        apply_rope(t, freqs[:1])                                 # broadcast over s: eager
    with pytest.raises(AssertionError, match="eager path ran"):
        swiglu(x.detach()[..., :63])                             # an odd width: eager


def test_without_gradients_the_kernels_skip_autograd_with_the_same_bits(monkeypatch):
    """Under no_grad (the RL sampler's passes) the forward is called without its autograd
    Function, whose per-call cost is overhead there (apt/kernels/_autograd.py); the result is
    bit for bit the autograd path's. With a gradient to compute the Function runs."""
    import apt.kernels.linear as linear_mod
    torch.manual_seed(0)
    y = torch.randn(8, 3, 64)
    w = torch.rand(32) + 0.5
    lw = torch.randn(48, 32)
    _, freqs = _rope_inputs(8, 3, 1, 48, 48, 1, torch.float32)

    def forward(x):
        h = rms_norm(swiglu(x), w, 1e-6)
        return apply_rope(linear_mod.linear(h, lw).view(8, 3, 1, 48), freqs)

    with_autograd = forward(y.clone().requires_grad_())
    assert with_autograd.grad_fn is not None
    for function in (rmsnorm_mod._FusedRMSNorm, rope_mod._FusedRope, swiglu_mod._FusedSwiGLU,
                     linear_mod._OneDNNLinear):
        monkeypatch.setattr(function, "apply", _no_autograd)
    with torch.no_grad():
        assert torch.equal(forward(y), with_autograd)
    assert torch.equal(forward(y), with_autograd)   # grad mode on, no input requiring one
    with pytest.raises(AssertionError, match="autograd Function ran"):
        forward(y.clone().requires_grad_())


def _no_autograd(*args, **kwargs):
    raise AssertionError("the autograd Function ran without a gradient to compute")


def test_bad_input_is_one_clear_line():
    ops = load("rmsnorm", "cpu")
    with pytest.raises(RuntimeError, match="x and weight must share a dtype"):
        ops.forward(torch.randn(2, 4), torch.ones(4, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="d_rot must be even"):
        load("rope", "cpu").apply(torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 3), False, False)
    with pytest.raises(RuntimeError, match=r"y must be a contiguous \[rows, 2 \* f\] tensor"):
        load("swiglu", "cpu").forward(torch.randn(2, 5))


# -- CUDA sources ----------------------------------------------------------------------------
CUDA_KERNELS = ("rmsnorm", "rope", "swiglu")
CUDA_SOURCES = [_build.KERNEL_SOURCES / k / f"{k}_cuda.cu" for k in CUDA_KERNELS]
BINDINGS = [_build.KERNEL_SOURCES / k / f"{k}_cuda.cpp" for k in CUDA_KERNELS]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return str(Path(home) / "bin" / "nvcc") if (Path(home) / "bin" / "nvcc").is_file() else None


def _cuda_includes(nvcc):
    # nvcc may be a wrapper script: ask it where its toolkit's headers are
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                         text=True)
    match = re.search(r'INCLUDES="([^"]+)"', dry.stdout + dry.stderr)
    return match.group(1).split() if match else []


def test_cuda_kernels_compile_without_spills(tmp_path):
    """Each .cu compiles for sm_80 and sm_90 with the loader's flags, and ptxas reports no
    spills for any function; the bindings pass the host compiler's syntax check against
    torch's headers (the CPU wheel lacks one generated CUDA header: a stand-in defines it)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): the CUDA sources cannot be compiled here")
    from torch.utils import cpp_extension
    # the flags cpp_extension compiles with (no implicit half/bf16 conversions), and the loader's
    jobs = [subprocess.Popen([nvcc, "-c", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS,
                              *_build.CUDA_FLAGS, "-Xptxas", "-v",
                              str(src), "-o", str(tmp_path / (src.stem + ".o"))],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for src in CUDA_SOURCES]
    # One translation unit for all the bindings: torch's headers are parsed once.
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    both = tmp_path / "bindings.cpp"
    both.write_text("".join(f'#include "{b}"\n' for b in BINDINGS))
    host = subprocess.run(
        ["c++", "-fsyntax-only", "-std=c++20", "-w", f"-I{tmp_path / 'shim'}",
         *[f"-I{p}" for p in cpp_extension.include_paths()], *_cuda_includes(nvcc),
         f"-I{sysconfig.get_paths()['include']}", str(both)],
        capture_output=True, text=True)
    assert host.returncode == 0, host.stderr[-3000:]
    for src, job in zip(CUDA_SOURCES, jobs):
        out, _ = job.communicate()
        assert job.returncode == 0, out[-3000:]
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
        entries = re.findall(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", out)
        assert {arch for _, arch in entries} == {"80", "90"}, out[-2000:]
        assert len(spills) >= len(entries) > 0
        assert all(s == ("0", "0") for s in spills), f"{src.name} spills registers:\n{out}"


def test_a_killed_builds_lock_is_cleared_and_a_fresh_one_kept(tmp_path, caplog):
    """cpp_extension waits for ever on a build folder's ``lock``; a run killed mid-build left
    one behind and the next run hung at start-up (apt/kernels/_build.py)."""
    from apt.kernels._build import STALE_LOCK_S, clear_stale_lock
    lock = tmp_path / "lock"
    lock.touch()
    clear_stale_lock(tmp_path)
    assert lock.exists() and "waiting for another process's build" in caplog.text
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    clear_stale_lock(tmp_path)
    assert not lock.exists() and "left by a build that was killed" in caplog.text
