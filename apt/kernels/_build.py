"""Build a fused kernel from ``kernels/<name>/`` on first use (torch.utils.cpp_extension).

Sources live at the repository root (``kernels/``, next to ``apt/``), one folder per kernel:
``<name>_cpu.cpp`` is the CPU kernel; ``<name>_cuda.cu`` (raw pointers, no torch headers: it
compiles without the CUDA parts of torch, see FEASIBILITY.md) plus ``<name>_cuda.cpp`` (the
binding, which takes tensors and the caller's stream) are the GPU kernel. The compiled module
goes to ``TORCH_EXTENSIONS_DIR`` and is reused while the sources are unchanged (cpp_extension
hashes them); several processes building at once wait on its lock. Nothing compiled ships.

A kernel is either a Python module (its binding defines ``PYBIND11_MODULE`` and includes
``torch/extension.h``) or, lighter to compile (about a fifth of the compile time), a library of
torch ops registered with ``TORCH_LIBRARY(apt_<name>_<device_type>, m)`` from
``ATen/core/Tensor.h`` + ``torch/library.h``: ``load`` then returns the op namespace
``torch.ops.apt_<name>_<device_type>``, whose attributes are the kernel's functions, the same
way a module's are.

A build that fails (no compiler, no CUDA toolkit) raises ``KernelUnavailable`` with the reason;
``apt.kernels.resolve`` turns that into eager fallback for ``auto`` and an error for a kernel a
profile asked for by name.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

KERNEL_SOURCES = Path(__file__).resolve().parents[2] / "kernels"
log = logging.getLogger(__name__)

# -O3 and OpenMP: at::parallel_for is an inline template whose OpenMP region is compiled into
# the extension itself; without -fopenmp it silently runs on one thread.
CPU_FLAGS = ["-O3", "-fopenmp", "-march=x86-64-v2"]
CUDA_ARCHS = ("80", "90")  # A100, H100/H200
CUDA_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"] + [
    f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]


class KernelUnavailable(RuntimeError):
    """A fused kernel cannot be built or loaded on this machine."""


def sources(name: str, device_type: str) -> list[Path]:
    folder = KERNEL_SOURCES / name
    if device_type == "cpu":
        wanted = [folder / f"{name}_cpu.cpp"]
    elif device_type == "cuda":
        wanted = [folder / f"{name}_cuda.cpp", folder / f"{name}_cuda.cu"]
    else:
        raise KernelUnavailable(f"kernel {name!r} has no {device_type} implementation")
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise KernelUnavailable(f"kernel {name!r}: sources not found: {', '.join(missing)} "
                                "(an install without the repository's kernels/ folder)")
    return wanted


def load(name: str, device_type: str):
    """The compiled extension module of kernel ``name`` for ``device_type`` ('cpu' / 'cuda');
    raises ``KernelUnavailable``. Both outcomes are remembered: a failed build is not retried
    on every call."""
    outcome = _load_once(name, device_type)
    if isinstance(outcome, KernelUnavailable):
        raise outcome
    return outcome


def available(name: str, device_type: str) -> bool:
    return not isinstance(_load_once(name, device_type), KernelUnavailable)


@functools.cache
def _load_once(name: str, device_type: str):
    try:
        return _build(name, device_type)
    except KernelUnavailable as err:
        return err


# A CPU kernel builds in 15-45 s, a CUDA one in a few minutes: a build lock older than this
# was left by a build that was killed (cpp_extension's lock holds no PID to check).
STALE_LOCK_S = 900


def clear_stale_lock(build_dir: Path) -> None:
    """cpp_extension waits, silently and for ever, while its build folder's ``lock`` file
    exists; a run killed mid-build leaves it behind. Remove one older than STALE_LOCK_S; for a
    younger one say what the wait is and how to end it if nothing is building."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("kernel build lock %s is %.0f s old, left by a build that was killed: "
                    "removing it", lock, age)
        lock.unlink(missing_ok=True)
    else:
        log.warning("kernel build lock %s (%.0f s old): waiting for another process's build; "
                    "if none is running (a build killed halfway), delete that file", lock, age)


def refuse_if_disabled() -> None:
    """``APT_KERNELS=none`` in the environment turns every kernel off (eager everywhere)."""
    if os.environ.get("APT_KERNELS") == "none":
        raise KernelUnavailable("APT_KERNELS=none in the environment")


def _build(name: str, device_type: str):
    refuse_if_disabled()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise KernelUnavailable("no CUDA device")
    files = sources(name, device_type)
    from torch.utils import cpp_extension

    # Torch-op libraries are loaded with torch.ops.load_library instead of imported.
    python_module = any("PYBIND11_MODULE" in p.read_text() for p in files if p.suffix == ".cpp")
    start = time.perf_counter()
    log.info("kernel %s (%s): loading, building on first use (about a minute)", name,
             device_type)
    # The build's name carries a digest of its sources and flags: two checkouts (or a helper's
    # worktree and main) sharing one TORCH_EXTENSIONS_DIR would otherwise rebuild over each
    # other's folder, and a process could load the other's library or fail mid-build.
    digest = hashlib.sha256()
    for path in files + sorted((KERNEL_SOURCES / "common").glob("*")):  # + shared headers
        digest.update(path.read_bytes())
    digest.update(repr((CPU_FLAGS, CUDA_FLAGS, torch.__version__)).encode())
    build_name = f"apt_{name}_{device_type}_{digest.hexdigest()[:10]}"
    clear_stale_lock(Path(cpp_extension._get_build_directory(build_name, verbose=False)))
    try:
        module = cpp_extension.load(
            name=build_name,
            sources=[str(p) for p in files],
            extra_cflags=CPU_FLAGS,
            extra_cuda_cflags=CUDA_FLAGS,
            extra_ldflags=["-fopenmp"] if device_type == "cpu" else [],
            with_cuda=device_type == "cuda",
            is_python_module=python_module,
            verbose=os.environ.get("APT_KERNELS_VERBOSE") == "1",
        )
    except Exception as err:  # compiler missing or failing, linker, import
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KernelUnavailable(f"kernel {name!r} ({device_type}) did not build: {first}") \
            from err
    if not python_module:
        module = getattr(torch.ops, f"apt_{name}_{device_type}")
    log.info("kernel %s (%s): ready in %.1f s", name, device_type,
             time.perf_counter() - start)
    return module
