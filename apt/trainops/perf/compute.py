"""Time of the arithmetic of one transformer layer (and the logits) on one GPU.

GEMMs run at the GPU's best measured rate (gemm_fraction of the peak) times a shape factor:
output tiles padded to the kernel's tile (128 x 256) and spread over the SMs in whole waves
(wave quantization), capped by HBM traffic (roofline) for thin GEMMs. Attention runs at the
flash-attention fraction of the peak (fused), or unfused (Megatron's local spec, CPU, and
pre-FlashAttention Megatron-LM) as batched GEMMs over the full score square at the roofline plus
the softmax/dropout passes over the scores. Element-wise work (norms, activations, residuals,
RoPE, dropout, MoE permutation and the all-to-all dispatcher's sort by local expert, GPT-OSS's
eager GLU clamp and expert bias) streams HBM, and so does the loss: Megatron-core's default
unfused cross-entropy, or the fused kernel the row's software ran (TE's, flash-attention's
xentropy).
Backward GEMMs are the two transposed products (input gradient, weight gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import Hardware
from .shape import Layout, ModelShape

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "tf32": 4, "fp32": 4}


def gemm_shape_efficiency(m: int, n: int, hw: Hardware) -> float:
    """Fraction of the large-GEMM rate an (m x n) output keeps after tile padding and wave
    quantization, in the better of the two tile orientations (cuBLAS picks)."""
    if not hw.sms:
        return 1.0
    best = 0.0
    for tm, tn in (hw.gemm_tile, hw.gemm_tile[::-1]):
        tiles = math.ceil(m / tm) * math.ceil(n / tn)
        padded = (m * n) / (tiles * tm * tn)
        waves = math.ceil(tiles / hw.sms)
        best = max(best, padded * tiles / (waves * hw.sms))
    return best


def gemm_time(m: float, n: float, k: float, hw: Hardware, dtype: str) -> float:
    """Seconds for an (m x k) @ (k x n) product."""
    m, n, k = max(1, round(m)), max(1, round(n)), max(1, round(k))
    rate = hw.peak(dtype) * hw.gemm_fraction * gemm_shape_efficiency(m, n, hw)
    traffic = ELEMENT_BYTES[dtype] * (m * k + k * n + m * n)
    return max(2.0 * m * n * k / rate, traffic / (hw.hbm_bytes_s * hw.hbm_fraction))


def linear_times(tokens: float, fan_in: float, fan_out: float, hw: Hardware, dtype: str,
                 count: int = 1) -> tuple[float, float]:
    """(forward, backward) seconds of ``count`` linear layers of this shape."""
    fwd = gemm_time(tokens, fan_out, fan_in, hw, dtype)
    bwd = gemm_time(tokens, fan_in, fan_out, hw, dtype) + gemm_time(fan_in, fan_out, tokens,
                                                                     hw, dtype)
    return count * fwd, count * bwd


def batched_gemm_time(batch: float, m: float, n: float, k: float, hw: Hardware,
                      dtype: str) -> float:
    """Seconds for ``batch`` independent (m x k) @ (k x n) products in one kernel: tiles of all
    of them share the waves; each reads its own operands (roofline)."""
    rate = hw.peak(dtype) * hw.gemm_fraction * gemm_shape_efficiency(
        max(1, round(batch * m)), max(1, round(n)), hw)
    traffic = ELEMENT_BYTES[dtype] * batch * (m * k + k * n + m * n)
    return max(2.0 * batch * m * n * k / rate, traffic / (hw.hbm_bytes_s * hw.hbm_fraction))


# Bytes per score element an unfused attention moves besides its GEMMs' own operands: the
# fused scale-mask-softmax reads and writes the scores; dropout reads them and writes its
# output and a 1-byte mask (forward); backward: dropout's (gradient read, mask read, write)
# and softmax's (output and gradient read, write). Korthikanti et al. 2022 (arXiv 2205.05198)
# section 4.1 counts exactly these tensors per layer (2as^2b softmax output, as^2b mask,
# 2as^2b dropout output), the reason their selective recompute redoes this part.
UNFUSED_SOFTMAX_PASSES = (2, 3)          # (forward, backward) element reads/writes
UNFUSED_DROPOUT_PASSES = (2, 2)          # plus the 1-byte mask once each way


# Bytes per logit element the loss moves, forward + backward, as Megatron-core's vocabulary-
# parallel cross-entropy does by default (cross_entropy_loss_fusion=False in
# megatron/core/model_parallel_config.py; megatron/core/tensor_parallel/cross_entropy.py):
# forward: .float() (read bf16 2, write fp32 4), max (read 4), subtract the max in place
# (4 + 4), exp in place (4 + 4), sum (4), divide in place (4 + 4) = 38; backward: scale the
# softmax by the incoming gradient in place (4 + 4) and .float()'s backward back to bf16
# (4 + 2) = 14. The earlier model counted 3 fp32 passes (12 bytes), a fused loss.
CROSS_ENTROPY_BYTES = 52
# A fused loss kernel instead (a layout's `loss: xentropy`): flash-attention's
# xentropy_cuda_lib (csrc/xentropy/xentropy_kernel.cu, v1.0.x; llm-foundry's default
# loss_fn: fused_crossentropy) reads the 16-bit logits twice forward (max with the sum, then the
# sum of exponentials: two ilpReduce passes in cunn_SoftMaxXEntropyForward) and once backward,
# writing the gradient once: 4 element passes at the logits' width.
XENTROPY_PASSES = 4

# Element reads + writes per routed token-copy (x hidden) that Megatron-core's all-to-all token
# dispatcher adds when a rank holds more than one expert: after the all-to-all it sorts the
# received tokens by local expert and unsorts them before the combine (sort_chunks_by_idxs in
# MoEAlltoAllTokenDispatcher.dispatch_postprocess / combine_preprocess,
# megatron/core/transformer/moe/token_dispatcher.py), one read and one write each, on top of
# the permute / unpermute every dispatcher does.
MOE_SORT_ELEMENTS = 4

# TE's fused cross-entropy (`loss: te`; cross_entropy_loss_fusion with
# cross_entropy_fusion_impl="te", as Megatron-Bridge's performance scripts set;
# transformer_engine/pytorch/triton/cross_entropy.py):
# the online-softmax pass reads the logits, the loss kernel reads them again and writes the
# gradient in place, the backward scales it by the per-token gradient in place (read, write):
# 5 passes over the logits in their own 16-bit dtype, against the unfused loss's 52 bytes.
FUSED_CROSS_ENTROPY_PASSES = 5

# GPT-OSS's clamped GLU (activation_func_clamp_value): before the fused quick-GEGLU kernel,
# Megatron-core clamps the two halves and concatenates them in eager ops
# (weighted_bias_quick_geglu_impl, megatron/core/fusions/fused_bias_geglu.py, core 0.15/0.16):
# forward: two clamps (read + write each half) and the cat (read + write both) = 8 x width
# elements per routed token; backward: each clamp's backward (gradient and input read, write)
# and the chunk's backward cat (read + write both) = 10 x width.
GLU_CLAMP_ELEMENTS = (8, 10)

# Expert output bias (add_bias_linear with grouped GEMM): TEGroupedMLP._apply_bias
# (megatron/core/transformer/moe/experts.py) adds bias x routing prob expert by expert in eager
# ops: b * p (write), t + b*p (two reads, write), cat (read, write) = 6 x hidden elements per
# routed token forward; backward: the gradients of b and p (grad x p, grad x b: read, write,
# read for the sum, each) and split's backward cat (read, write) = 8 x hidden.
EXPERT_BIAS_ELEMENTS = (6, 8)


def unfused_attention_times(s: ModelShape, lay: Layout, hw: Hardware) -> tuple[float, float]:
    """(forward, backward) seconds of attention without a fused kernel (Megatron's local spec
    and the pre-FlashAttention Megatron-LM of 2022): QK^T and AV as batched GEMMs over the
    whole (queries x seq) square, the causal mask applied after (no work skipped), the scores
    written to HBM and streamed by softmax (and dropout)."""
    dt, e = lay.dtype, ELEMENT_BYTES[lay.dtype]
    q, keys, hd = s.seq / lay.cp, s.seq, s.head_dim
    batch = lay.micro_batch * s.heads / lay.tp
    qk = batched_gemm_time(batch, q, keys, hd, hw, dt)     # scores written
    av = batched_gemm_time(batch, q, hd, keys, hw, dt)     # probabilities read
    scores = batch * q * keys
    stream = hw.hbm_bytes_s * hw.hbm_fraction
    passes_f, passes_b = UNFUSED_SOFTMAX_PASSES
    mask = 0.0
    if s.dropout:
        passes_f += UNFUSED_DROPOUT_PASSES[0]
        passes_b += UNFUSED_DROPOUT_PASSES[1]
        mask = 1.0
    fwd = qk + av + scores * (passes_f * e + mask) / stream
    # backward: dP = dO V^T (writes scores), dV = P^T dO (reads them), dQ = dS K and
    # dK = dS^T Q (read them): each the shape of one forward GEMM
    bwd = (batched_gemm_time(batch, q, keys, hd, hw, dt) + 3 * av
           + scores * (passes_b * e + mask) / stream)
    return fwd, bwd


@dataclass(frozen=True)
class LayerCompute:
    """Seconds of one layer for one micro-batch on one GPU."""
    gemm_fwd: float
    gemm_bwd: float
    attention_fwd: float
    attention_bwd: float
    elementwise_fwd: float
    elementwise_bwd: float
    # the parts of elementwise_fwd that Megatron's selective recompute modules redo
    norm_fwd: float = 0.0         # "layernorm": the MoE layer's pre-MLP norm
    moe_act_fwd: float = 0.0      # "moe_act": the experts' activation (and GPT-OSS's clamp)

    @property
    def forward(self) -> float:
        return self.gemm_fwd + self.attention_fwd + self.elementwise_fwd

    @property
    def total(self) -> float:
        return (self.forward + self.gemm_bwd + self.attention_bwd + self.elementwise_bwd)


def layer_compute(shape: ModelShape, lay: Layout, hw: Hardware, fused_attention: bool = True
                  ) -> LayerCompute:
    s, tp, dt = shape, lay.tp, lay.dtype
    tokens = lay.micro_batch * s.seq / lay.cp          # this GPU's tokens (full, before SP)
    e = ELEMENT_BYTES[dt]
    fwd = bwd = 0.0
    for fan_in, fan_out in ((s.hidden, (s.q_dim + 2 * s.kv_dim) / tp), (s.q_dim / tp, s.hidden)):
        f, b = linear_times(tokens, fan_in, fan_out, hw, dt)
        fwd, bwd = fwd + f, bwd + b
    width = s.expert_ffn or s.ffn
    up = (2 if s.gated else 1) * width / tp
    if s.moe:
        local = max(1, s.experts // lay.ep)
        per_expert = tokens * s.top_k / local    # tokens each local expert receives (balanced)
        for fan_in, fan_out in ((s.hidden, up), (width / tp, s.hidden)):
            f, b = linear_times(per_expert, fan_in, fan_out, hw, dt, count=local)
            fwd, bwd = fwd + f, bwd + b
        f, b = linear_times(tokens, s.hidden, s.experts, hw, dt)        # router
        fwd, bwd = fwd + f, bwd + b
    else:
        for fan_in, fan_out in ((s.hidden, up), (width / tp, s.hidden)):
            f, b = linear_times(tokens, fan_in, fan_out, hw, dt)
            fwd, bwd = fwd + f, bwd + b

    # Attention core: QK^T and AV, 4 x queries x keys x head_dim x heads (FlashAttention's
    # count, the causal half skipped); its backward does 2.5x the forward's work (it recomputes
    # the scores), the convention of flash-attention's benchmark (fwd + bwd = 3.5 x fwd FLOPs).
    # The kernel generation sets the rate: FlashAttention-1-era kernels use Ampere's mma.sync and
    # reach a smaller fraction of the peak, much smaller on Hopper (hardware.yaml).
    stream = hw.hbm_bytes_s * hw.hbm_fraction
    if fused_attention and lay.attention != "unfused":
        attn_flops = 4.0 * tokens * s.mean_keys() * s.q_dim / tp
        attn_fwd = attn_flops / (hw.peak(dt) * hw.attention_rate_fraction(
            lay.attention, s.head_dim, s.seq))
        attn_bwd = 2.5 * attn_fwd
    else:
        attn_fwd, attn_bwd = unfused_attention_times(s, lay, hw)

    # Element-wise bytes per token, forward: two norms (read + write h), two residual adds
    # (2 reads + 1 write), RoPE on q and k (where the model has it), the MLP activation, MoE
    # permute/unpermute; with dropout, two hidden dropouts (read, write, 1-byte mask each).
    sp_split = tp if lay.sp else 1
    per_token = (4 * s.hidden + 6 * s.hidden) / sp_split
    if s.rope:
        per_token += 2 * (s.q_dim + s.kv_dim) / tp
    if s.dropout:
        per_token += 2 * s.hidden * (2 + 1 / e) / sp_split
    routed = s.top_k if s.moe else 1
    activation = routed * (3 if s.gated else 2) * width / tp
    per_token += activation
    if s.moe:
        per_token += 4 * s.top_k * s.hidden / sp_split
        if lay.ep > 1 and s.experts // lay.ep > 1:
            per_token += MOE_SORT_ELEMENTS * s.top_k * s.hidden / sp_split
    # Eager passes whose backward is counted from the code, not as twice the forward.
    clamp_f, clamp_b = ((n * routed * width / tp for n in GLU_CLAMP_ELEMENTS)
                        if s.glu_clamp else (0.0, 0.0))
    bias_f, bias_b = ((n * s.top_k * s.hidden / sp_split for n in EXPERT_BIAS_ELEMENTS)
                      if s.moe and s.linear_bias else (0.0, 0.0))
    per_byte = tokens * e / stream
    return LayerCompute(gemm_fwd=fwd, gemm_bwd=bwd, attention_fwd=attn_fwd,
                        attention_bwd=attn_bwd,
                        elementwise_fwd=(per_token + clamp_f + bias_f) * per_byte,
                        elementwise_bwd=(2 * per_token + clamp_b + bias_b) * per_byte,
                        norm_fwd=2 * s.hidden / sp_split * per_byte if s.moe else 0.0,
                        moe_act_fwd=(activation + clamp_f) * per_byte if s.moe else 0.0)


def logits_time(shape: ModelShape, lay: Layout, hw: Hardware) -> float:
    """Output projection forward + backward and the cross-entropy's passes over the logits
    (unfused: Megatron-core's default; te / xentropy: the fused kernels) on the last pipeline
    stage, one micro-batch."""
    tokens = lay.micro_batch * shape.seq / lay.cp
    f, b = linear_times(tokens, shape.hidden, shape.vocab / lay.tp, hw, lay.dtype)
    per_logit = {"unfused": CROSS_ENTROPY_BYTES,
                 "te": FUSED_CROSS_ENTROPY_PASSES * ELEMENT_BYTES[lay.dtype],
                 "xentropy": XENTROPY_PASSES * ELEMENT_BYTES[lay.dtype]}[lay.loss]
    ce = tokens * shape.vocab / lay.tp * per_logit / (hw.hbm_bytes_s * hw.hbm_fraction)
    return f + b + ce
