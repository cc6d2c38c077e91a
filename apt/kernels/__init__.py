"""APT's fused kernels: one Python function per kernel, fused where a kernel is built for the
tensor's device, eager otherwise.

- ``rms_norm(x, weight, eps)``: RMSNorm forward and backward (``kernels/rmsnorm``).
- ``apply_rope(t, freqs, interleaved=False)``: rotary embeddings with Megatron's layout and
  semantics (``kernels/rope``).
- ``swiglu(y)``: ``silu(a) * b`` of ``y = [a | b]``, forward and backward without splitting
  ``y`` or concatenating its gradient (``kernels/swiglu``).
- ``linear_cross_entropy(hidden, weight, labels, tp_group=None)``: the output projection and
  the cross-entropy in chunks, vocabulary-parallel under TP (``kernels/linear_cross_entropy``).
- ``linear``: not compiled here: the transformer layers' fp32 GEMMs on CPU through oneDNN
  instead of MKL (``apt/kernels/linear.py`` says why), CPU only.

The model picks them through the profile key ``model.kernels`` (``resolve``): the layer spec's
norms and MLP activation, Megatron's RoPE hook and the output layer call these functions, so
the model code is the same with kernels on or off, and so are its losses.
"""
from __future__ import annotations

import logging
from typing import Iterable, Union

from importlib import import_module

# Compiled from kernels/<name>/ (python -m apt.kernels builds these).
BUILT = ("rmsnorm", "rope", "swiglu", "linear_cross_entropy")
# What model.kernels names: the built ones and oneDNN's GEMMs for the linear layers.
KERNELS = ("rmsnorm", "rope", "swiglu", "linear", "linear_cross_entropy")
log = logging.getLogger(__name__)

KernelSetting = Union[str, Iterable[str]]


def check_setting(setting: KernelSetting) -> str | None:
    """The reason ``setting`` is not a valid ``model.kernels`` value, or None."""
    if isinstance(setting, str):
        return None if setting in ("auto", "none") else \
            f"must be 'auto', 'none' or a list of {', '.join(KERNELS)}; got {setting!r}"
    if not isinstance(setting, (list, tuple)):
        return f"must be 'auto', 'none' or a list of kernel names; got {setting!r}"
    names = list(setting)
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        return f"unknown kernel(s) {', '.join(map(repr, unknown))}; known: {', '.join(KERNELS)}"
    return None


def resolve(setting: KernelSetting, device_type: str) -> tuple[str, ...]:
    """The kernels a model uses for ``model.kernels``: ``auto`` = every kernel that builds for
    ``device_type`` (one warning per kernel that does not, which then runs eager); ``none`` =
    none; a list = exactly those, and a kernel that cannot be built is an error."""
    problem = check_setting(setting)
    if problem:
        raise ValueError(f"model.kernels {problem}")
    if setting == "none":
        return ()
    from ._build import KernelUnavailable
    wanted = KERNELS if setting == "auto" else tuple(dict.fromkeys(setting))
    chosen = []
    for name in wanted:
        try:
            _check_usable(name, device_type)
        except KernelUnavailable as err:
            if name == "linear" and setting == "auto" and device_type != "cpu":
                continue   # CPU-only by design: cuBLAS is the GPU's GEMM, nothing to warn of
            if setting != "auto":
                raise
            log.warning("%s; it runs eager", err)
            continue
        chosen.append(name)
    return tuple(chosen)


def _check_usable(name: str, device_type: str) -> None:
    """Build (or find) kernel ``name`` for ``device_type``; raises ``KernelUnavailable``."""
    from ._build import KernelUnavailable, load, refuse_if_disabled
    if name != "linear":
        load(name, device_type)
        return
    from .linear import available as onednn_available
    refuse_if_disabled()
    if not onednn_available(device_type):
        raise KernelUnavailable(f"kernel 'linear' (oneDNN's GEMMs) is CPU-only and needs a torch "
                                f"built with MKL-DNN; not usable on {device_type}")


__all__ = ["BUILT", "KERNELS", "KernelUnavailable", "available", "check_setting", "load", "resolve"]


# The builder's names load on first use (PEP 562): config validation (check_setting) runs in
# every command, `trainops plan` included, and must not import torch for it.
_BUILD_NAMES = ("KernelUnavailable", "available", "load", "refuse_if_disabled")


def __getattr__(name: str):
    if name not in _BUILD_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module("._build", __name__), name)
    globals()[name] = value
    return value
