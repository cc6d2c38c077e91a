"""The output projection and the cross-entropy in one: per-token ``logsumexp(h W^T) - (h W^T)[y]``
over the whole (vocabulary-parallel) vocabulary.

The fused path never holds the [tokens, vocab] logits. It walks blocks of (token rows x
vocabulary slice): one matmul (ATen: cuBLAS / oneDNN, in the input dtype) writes the block
into a reused buffer and a row kernel (``kernels/linear_cross_entropy``) folds it into running
per-row (max, sum of exp, target logit) in fp32: an online logsumexp. Under tensor parallelism
those three [tokens] vectors are combined across the TP group (max, then the rescaled sums and
target logits, as Megatron's vocab-parallel cross-entropy does). Backward recomputes each
block, turns it in place into ``(softmax - onehot) * grad_loss`` with the saved global
logsumexp, and multiplies it into dh and dW. Extra memory: one block buffer plus [tokens]
vectors, and an fp32 accumulator for dW's slice / dh when the inputs are bf16/fp16 and the
sum runs over several blocks (a bf16 running sum would round at every block).

One pass instead of two: that backward recomputes every logit, a third more matmul work than
the unfused path (forward, then dh and dW). When the caller says how it will weigh the
per-token losses (``weights``: the loss mask, which the language-model objective multiplies in
before summing) and the vocabulary is not split over TP, the forward walks blocks of whole
vocabulary rows: each block's logsumexp is final at once, so the same block also gives
``(softmax - onehot) * weight`` and its products into dh and dW, kept for backward (Liger's
approach). Backward then only scales them, when the incoming gradient is ``c * weights`` for
one scalar c, as for a masked sum; any other gradient (a caller that weighs the tokens
otherwise) takes the recomputing backward, so the result is right either way.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from ._build import KernelUnavailable, load
from .linear import onednn_linear, supported as onednn_supported
from .logit_blocks import _BLOCK_LOGITS, _ROWS, block_shape  # noqa: F401  (re-exported)

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def eager_linear_cross_entropy(hidden, weight, labels, tp_group=None):
    logits = hidden @ weight.t()
    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1:
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float()[None], labels[None])[0]


def _spans(total: int, step: int):
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _tp(tp_group):
    if tp_group is None or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)


class _Blocks:
    """The (token, vocabulary) block walk and its one reused logits buffer.

    On CPU in fp32 the row-major products (the logits, dh) go through oneDNN, as the linear
    layers' do (``apt/kernels/linear.py``: MKL's sgemm leaves AVX-512 unused on AMD CPUs)."""

    def __init__(self, hidden, weight, rows, cols):
        self.hidden, self.weight = hidden, weight
        self.token_spans = _spans(hidden.shape[0], rows)
        self.vocab_spans = _spans(weight.shape[0], cols)
        self.buffer = torch.empty(rows * cols, dtype=hidden.dtype, device=hidden.device)
        self.onednn = onednn_supported(hidden, weight)

    def logits(self, r0, r1, w_block):
        """h[r0:r1] @ w_block^T written into the buffer: one allocation for the whole walk
        (on CPU a fresh large tensor per block would be fresh pages, zero-filled by the OS)."""
        out = self.buffer[:(r1 - r0) * w_block.shape[0]].view(r1 - r0, w_block.shape[0])
        if self.onednn:
            return out.copy_(onednn_linear(self.hidden[r0:r1], w_block, None))
        return torch.mm(self.hidden[r0:r1], w_block.t(), out=out)

    def grad_hidden(self, g_logits, w_block, out):
        """g_logits @ w_block into ``out`` (a slice of dh)."""
        if self.onednn:
            return out.copy_(onednn_linear(g_logits, w_block.t(), None))
        return torch.mm(g_logits, w_block, out=out)


def _grad_blocks(blocks, labels, vocab_start, grad, kernel, want_h, want_w, lse, target=None):
    """dh and dW of sum(grad * loss): the block walk, each block of logits turned in place into
    ``(softmax - onehot) * grad`` with the final logsumexp ``lse``. With ``target`` (the
    one-pass walk, blocks of whole vocabulary rows) each block's logsumexp and target logit
    are first computed here, into ``lse`` and ``target``."""
    hidden, weight = blocks.hidden, blocks.weight
    exact = hidden.dtype == torch.float32
    # Sums over several blocks run in fp32 for bf16/fp16 inputs, then round once, as one
    # unfused matmul would.
    h_acc = exact or len(blocks.vocab_spans) == 1
    grad_h = None
    if want_h:
        grad_h = torch.empty_like(hidden) if h_acc else torch.zeros_like(
            hidden, dtype=torch.float32)
    grad_w = None
    if want_w:   # every slice is written below, unless there are no tokens at all
        grad_w = torch.empty_like(weight) if blocks.token_spans else torch.zeros_like(weight)
    for j, (v0, v1) in enumerate(blocks.vocab_spans):
        w_block = weight[v0:v1]
        w_direct = exact or len(blocks.token_spans) == 1
        gw = None
        if want_w:
            gw = grad_w[v0:v1] if w_direct else torch.zeros(
                v1 - v0, weight.shape[1], dtype=torch.float32, device=weight.device)
        for i, (r0, r1) in enumerate(blocks.token_spans):
            g_logits = blocks.logits(r0, r1, w_block)
            if target is not None:   # whole rows: the block's logsumexp is final at once
                m = torch.full((r1 - r0,), float("-inf"), dtype=torch.float32,
                               device=hidden.device)
                s = torch.zeros_like(m)
                target[r0:r1] = 0.0
                kernel.stats_(g_logits, labels[r0:r1], vocab_start, m, s, target[r0:r1])
                torch.add(m, torch.log(s), out=lse[r0:r1])
            kernel.softmax_grad_(g_logits, labels[r0:r1], vocab_start + v0, lse[r0:r1],
                                 grad[r0:r1])
            if want_h:
                if not h_acc:
                    grad_h[r0:r1] += torch.mm(g_logits, w_block)
                elif j == 0:
                    blocks.grad_hidden(g_logits, w_block, grad_h[r0:r1])
                else:
                    grad_h[r0:r1].addmm_(g_logits, w_block)
            if want_w:
                if not w_direct:
                    gw += torch.mm(g_logits.t(), hidden[r0:r1])
                elif i == 0:
                    torch.mm(g_logits.t(), hidden[r0:r1], out=gw)
                else:
                    gw.addmm_(g_logits.t(), hidden[r0:r1])
        if want_w and not w_direct:
            grad_w[v0:v1].copy_(gw)
    if grad_h is not None and grad_h.dtype != hidden.dtype:
        grad_h = grad_h.to(hidden.dtype)
    return grad_h, grad_w


def _scale_of(grad, weights):
    """c when ``grad == c * weights`` exactly (a masked sum's gradient), else None."""
    k = int(weights.abs().argmax()) if weights.numel() else 0
    if not weights.numel() or float(weights[k]) == 0.0:
        return None
    c = grad[k] / weights[k]
    return c if torch.equal(grad, c * weights) else None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, rows, cols, kernel, weights):
        n = hidden.shape[0]
        rank, world = _tp(tp_group)
        vocab_start = rank * weight.shape[0]   # Megatron's VocabUtility: equal contiguous shards
        ctx.vocab_start, ctx.rows, ctx.cols, ctx.kernel = vocab_start, rows, cols, kernel
        blocks = _Blocks(hidden, weight, rows, cols)
        if weights is not None:   # one pass: the loss, and the gradient for grad = c * weights
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            target = torch.empty_like(lse)
            ctx.precomputed = _grad_blocks(blocks, labels, vocab_start, weights, kernel,
                                           *ctx.needs_input_grad[:2], lse, target)
            ctx.save_for_backward(hidden, weight, labels, lse, weights)
            return lse - target
        m = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        s = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        t = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for v0, v1 in blocks.vocab_spans:
            w_block = weight[v0:v1]
            for r0, r1 in blocks.token_spans:
                kernel.stats_(blocks.logits(r0, r1, w_block), labels[r0:r1], vocab_start + v0,
                              m[r0:r1], s[r0:r1], t[r0:r1])
        del blocks
        if world > 1:
            # As Megatron: the global max, each rank's sum rescaled to it, summed; the target
            # logit is nonzero only on the rank owning the label, so a sum gathers it.
            global_max = m.clone()
            torch.distributed.all_reduce(global_max, torch.distributed.ReduceOp.MAX,
                                         group=tp_group)
            s.mul_(torch.exp(m - global_max))
            torch.distributed.all_reduce(s, group=tp_group)
            torch.distributed.all_reduce(t, group=tp_group)
            m = global_max
        lse = m + torch.log(s)
        ctx.precomputed = None
        ctx.save_for_backward(hidden, weight, labels, lse, None)
        return lse - t

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse, weights = ctx.saved_tensors
        grad = grad_loss.float().contiguous()
        if ctx.precomputed is not None:
            c = _scale_of(grad, weights)
            if c is not None:
                # a Python float: multiplied in fp32 (a 0-dim tensor would round c to bf16)
                grads = tuple(None if g is None else g.mul_(float(c)) for g in ctx.precomputed)
                ctx.precomputed = None
                return (*grads, None, None, None, None, None, None)
            ctx.precomputed = None   # weighed otherwise: recompute
        blocks = _Blocks(hidden, weight, ctx.rows, ctx.cols)
        grad_h, grad_w = _grad_blocks(blocks, labels, ctx.vocab_start, grad, ctx.kernel,
                                      *ctx.needs_input_grad[:2], lse)
        return grad_h, grad_w, None, None, None, None, None, None


def _check(hidden, weight, labels):
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"linear_cross_entropy: expected hidden [n, H], weight [V, H], labels "
                         f"[n]; got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1] or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: shapes do not match: hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels "
                         f"{tuple(labels.shape)}")
    if hidden.dtype != weight.dtype or hidden.device != weight.device \
            or labels.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: hidden and weight need one dtype and device "
                         f"(labels too); got {hidden.dtype}/{hidden.device}, "
                         f"{weight.dtype}/{weight.device}, labels on {labels.device}")


def fused_kernel(hidden: torch.Tensor):
    """The compiled row kernels for ``hidden``'s device and dtype, or None (eager path)."""
    if hidden.dtype not in _FUSED_DTYPES:
        return None
    try:
        return load("linear_cross_entropy", hidden.device.type)
    except KernelUnavailable:
        return None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         tp_group=None, chunk_tokens: int | None = None,
                         chunk_vocab: int | None = None,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss [n] (fp32) of ``hidden`` [n, H] against ``labels`` [n] for the output
    weight shard ``weight`` [V / TP, H] (rank r holds rows r*V/TP...(r+1)*V/TP, Megatron's
    vocab-parallel layout). The gradient it gives ``hidden`` is this rank's partial sum: the
    caller's TP mapping (copy / sequence-parallel gather) reduces it, as for the output layer.

    Fused (``kernels/linear_cross_entropy``, blocks of ``chunk_tokens`` x ``chunk_vocab``
    logits; defaults in ``block_shape``) when the kernel builds for the device and the dtype
    is fp32/bf16/fp16; eager otherwise. Labels must lie in [0, V): the fused path does not
    check them on the GPU (that would synchronise every step); no ignore index (mask the
    per-token loss instead).

    ``weights`` [n]: how the caller will weigh the per-token losses before summing them (the
    loss mask). With them, no TP split and a gradient wanted, the gradient is computed in the
    forward pass (one walk over the logits instead of two; the module docstring says how);
    the result is the same whatever gradient backward then receives."""
    _check(hidden, weight, labels)
    kernel = fused_kernel(hidden)
    if kernel is None:
        return eager_linear_cross_entropy(hidden, weight, labels, tp_group)
    labels = labels.to(torch.int64).contiguous()
    if hidden.device.type == "cpu" and labels.numel():
        _, world = _tp(tp_group)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= weight.shape[0] * world:
            raise ValueError(f"linear_cross_entropy: labels must lie in [0, "
                             f"{weight.shape[0] * world}); got {low}..{high}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"linear_cross_entropy: weights {tuple(weights.shape)} do not match "
                         f"labels {tuple(labels.shape)}")
    one_pass = (weights is not None and _tp(tp_group)[1] == 1 and chunk_vocab is None
                and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))
    rows, cols = block_shape(hidden.shape[0], weight.shape[0], hidden.device.type,
                             chunk_tokens, chunk_vocab, whole_rows=one_pass)
    weights = weights.detach().float().contiguous() if one_pass else None
    return _FusedLinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), labels,
                                          tp_group, rows, cols, kernel, weights)
