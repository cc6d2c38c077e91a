"""The linear layers' GEMMs through oneDNN on CPU (fp32): forward and input gradient.

Why: PyTorch's fp32 ``mm`` on CPU is MKL's sgemm, and MKL does not use AVX-512 on AMD CPUs.
oneDNN (linked into the same torch build, behind ``torch.ops.mkldnn._linear_pointwise``)
picks its kernels by the CPU's instruction set. Measured on the AMD EPYC (Zen 4) CI machine,
2 threads, fp32: each GEMM alone (median of 20) 1.3-2.1x faster forward and 1.3-1.5x faster
input gradient than ``mm`` at the peer_hf shapes' fc1 and fc2; forward + backward with the
unchanged weight gradient (``bench/kernels.py``, interleaved) 0.99-1.17x; the whole tiny
peer_hf step 0.885x the time of HF's model step in-process (1.002x before). The weight
gradient stays ``mm``: ``_linear_pointwise`` wants row-major operands, and the weight
gradient's are both transposed (copying them lost more than oneDNN gained at the tiny shape).

Wired through the layer spec (``megatron_gpt.layer_spec``): the subclasses below replace
Megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` and route the plain case here:
no sequence parallelism, no gradient-accumulation fusion into ``main_grad``, no deferred
weight gradient. Everything else, and any tensor oneDNN does not take (bf16: ATen's ``mm``
already calls oneDNN for it; a GPU: cuBLAS), goes to Megatron's own implementation, with the
same semantics: under tensor parallelism the input gradient is all-reduced over the TP group
(``allreduce_dgrad``), as Megatron's does.

Not a kernel of ours: the GEMMs are oneDNN's. Results match ``mm`` to fp32 rounding (a
different summation order), the way a different thread count would.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from ._autograd import needs_autograd


@functools.cache
def available(device_type: str = "cpu") -> bool:
    """Whether this torch build has oneDNN's linear op (CPU builds with MKL-DNN do)."""
    return (device_type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight, ...)`` runs through oneDNN."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.numel() > 0 and available("cpu"))


def onednn_linear(x2d: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ weight.T (+ bias)``: [tokens, in] x [out, in] -> [tokens, out]."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``y = x W^T + b`` with oneDNN's forward and input gradient; ``tp_group``: all-reduce
    the input gradient over it (a column-parallel layer's input is replicated over TP)."""

    @staticmethod
    def forward(ctx, x, weight, bias, tp_group):
        x2d = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias, ctx.tp_group, ctx.shape = bias is not None, tp_group, x.shape
        return onednn_linear(x2d, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, weight = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        handle = None
        if ctx.needs_input_grad[0]:
            # dX = dY W, i.e. a linear with weight W^T: oneDNN takes the transposed view.
            grad_x = onednn_linear(g2d, weight.t(), None)
            if ctx.tp_group is not None:
                # Overlaps the weight gradient below, as Megatron's async all-reduce does.
                handle = dist.all_reduce(grad_x, group=ctx.tp_group, async_op=True)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g2d.t().mm(x2d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(dim=0)
        if handle is not None:
            handle.wait()
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tp_group=None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN, differentiable; ``tp_group``: all-reduce the
    input gradient over that group (None or a group of one: no all-reduce)."""
    if not needs_autograd(x, weight, bias):
        return onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(
            *x.shape[:-1], weight.shape[0])
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    return _OneDNNLinear.apply(x, weight, bias, tp_group)


def _plain_case(x, weight, kwargs) -> bool:
    """The case ``linear`` covers of the keyword arguments Megatron's layers pass to
    ``_forward_impl``; any other goes to Megatron's own implementation."""
    return (supported(x, weight) and not kwargs.get("sequence_parallel")
            and not kwargs.get("gradient_accumulation_fusion")
            and kwargs.get("grad_output_buffer") is None)


def _forward_impl(super_impl, input, weight, *args, **kwargs):
    if args or not _plain_case(input, weight, kwargs):
        return super_impl(input, weight, *args, **kwargs)
    tp_group = kwargs.get("tp_group") if kwargs.get("allreduce_dgrad") else None
    return linear(input, weight, kwargs.get("bias"), tp_group)


class OneDNNColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear`` whose GEMMs run through oneDNN in the plain case."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _forward_impl(super()._forward_impl, input, weight, *args, **kwargs)


class OneDNNRowParallelLinear(RowParallelLinear):
    """Megatron's ``RowParallelLinear`` whose GEMMs run through oneDNN in the plain case (its
    input is TP-split, so the input gradient needs no all-reduce: Megatron passes none)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _forward_impl(super()._forward_impl, input, weight, *args, **kwargs)


# The layer spec's replacements for Megatron's classes (``megatron_gpt.layer_spec``).
REPLACEMENTS = {ColumnParallelLinear: OneDNNColumnParallelLinear,
                RowParallelLinear: OneDNNRowParallelLinear}
