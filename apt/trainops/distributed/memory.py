"""Per-GPU memory estimate for a parallel layout.

Static part (exact for the layout, up to padding of flat buffers): weights, gradients and
optimizer state (fp32 master copies + Adam moments) of the busiest pipeline stage after TP/PP/EP
splitting and ZeRO / distributed-optimizer sharding over data-parallel ranks. Checked against
the tensors each rank really holds in tests/test_parallel_matrix.py.

Activations (an estimate): bytes saved for backward per transformer layer and micro-batch,
counted for the Llama block (RMSNorm, GQA attention, SwiGLU), with s = sequence, b =
micro-batch, h = hidden, f = FFN width (an expert's for MoE), q = query width (heads x head
dimension, h unless head_dim says otherwise), k = key/value width, a = heads, t = TP, in
16-bit units:
  boundary tensors (norm inputs/outputs)      8 s b h          (/t with sequence parallel)
  inside the TP region (q, k, v, attention out) s b (4q + 4k) / t
  SwiGLU (gate, up, silu(gate), product)      8 s b f / t
  attention probabilities (no fused attention) 2 a s^2 b / t   (dropped by selective recompute
                                                              and by fused/flash attention)
An MoE layer (top-k of E experts) keeps the SwiGLU tensors of k expert passes per token,
  8 s b k f / t, plus the permuted tokens going to and coming back from the experts, 2 s b k h
  (/t with SP): with expert parallel each rank's experts receive s b k tokens on average.
Full recompute keeps only each layer's input (2 s b h, /t with SP). 1F1B keeps up to PP
micro-batches in flight on the first stage (so about L layers' worth), interleaving adds the
factor 1 + (PP-1)/(PP*VP). fp32 training doubles every activation byte. The loss keeps fp32
logits of the last stage: 4 s b V / t; with the fused linear + cross-entropy kernel
(apt/kernels) only one block of them (at most 2^25 logits on a GPU) and a few fp32 values per
token.
Communication buffers: gradient-reduce bucket (fp32) plus, under ZeRO-3, the gathered
parameters of two layers (current and prefetched), plus with expert parallel one layer's
all-to-all send and receive buffers (2 s b k h).

GRPO (``generation_memory``) also holds, while it samples, Megatron's static KV cache: keys
and values of every layer of the stage for all the rank's completions of a round (global batch
/ DP rows) at full length (data.seq_length), k / t wide, in the weights' dtype; and the
last-position logits (Megatron materialises only those while sampling) gathered over TP in the
weights' dtype plus their fp32 copy. Sampling and the training passes do not overlap (the
cache is freed before the first micro-batch), so the peak is the larger of the two. The
round's rollouts stay on the device until its last step: per row, tokens and labels (int64),
the loss mask and the sampler's log-probs (fp32), plus old-policy log-probs (num_iterations >
1) and the reference's (beta > 0).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from apt.core.config.sizing import ParamCounts

GIB = 1024 ** 3
REDUCE_BUCKET_ELEMENTS = 50_000_000  # the bucket size APT configures for DeepSpeed/Megatron DDP


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    communication: float
    params_per_gpu: int
    trainable_per_gpu: int = 0   # equals params_per_gpu unless LoRA freezes the base
    host_optimizer: float = 0.0  # bytes kept in CPU memory with optimizer offload
    # Preference training's frozen reference in host memory (objectives/reference.py): its
    # weights plus the buffer the policy's weights wait in during the reference pass.
    host_reference: float = 0.0
    # GRPO: the sampler's KV cache and logits (not at the same time as activations), and the
    # round's rollouts (held throughout); 0 for the other objectives.
    generation: float = 0.0
    rollouts: float = 0.0

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return (self.static + self.rollouts
                + max(self.activations + self.communication, self.generation))

    def as_gib(self) -> dict:
        out = {k: v / GIB for k, v in asdict(self).items()
               if k not in ("params_per_gpu", "trainable_per_gpu")}
        out["total"] = self.total / GIB
        return out


def stage_params(counts: ParamCounts, *, tp: int, pp: int, ep: int) -> int:
    """Parameters held by one GPU of the busiest pipeline stage."""
    dense_per_layer = counts.attention_per_layer // tp + counts.norms_per_layer
    expert_per_layer = counts.mlp_per_layer // (tp * ep if counts.router_per_layer else tp)
    per_layer = dense_per_layer + expert_per_layer + counts.router_per_layer
    layers = math.ceil(counts.num_layers / pp) * per_layer
    embedding = counts.embedding // tp
    # With PP > 1 a tied embedding needs a copy of the embedding on the last stage too.
    output = (counts.output or (counts.embedding if pp > 1 else 0)) // tp
    if pp == 1:
        return layers + embedding + output + counts.final_norm
    return layers + max(embedding, output + counts.final_norm)


def estimate_memory(counts: ParamCounts, *, hidden: int, ffn: int, kv_dim: int, heads: int,
                    vocab: int, seq: int, micro_batch: int, grad_accum: int, tp: int, pp: int,
                    vp: int, dp: int, ep: int, cp: int, sequence_parallel: bool, zero_stage: int,
                    distributed_optimizer: bool, precision: str, recompute: str,
                    offload_optimizer: bool, fused_attention: bool,
                    lora_per_layer: int = 0, rows_per_sample: int = 1,
                    reference_weights: bool = False, moe_top_k: int = 0,
                    fused_loss: bool = False, device_type: str = "cuda",
                    q_dim: int | None = None) -> MemoryEstimate:
    """``lora_per_layer``: LoRA adapter parameters per layer on one TP rank (sizing.py); with
    adapters the base is frozen, so gradients and optimizer state exist for adapters only.
    ``rows_per_sample``: model rows per sample (a preference pair is 2: both answers go through
    the model together); ``reference_weights``: a frozen copy of the weights is kept in host
    memory (live preference reference); ``moe_top_k``: experts per token (0: dense MLP);
    ``fused_loss``: the loss comes from the fused linear + cross-entropy kernel; ``q_dim``:
    query width (heads x head dimension), default ``hidden``."""
    frozen = stage_params(counts, tp=tp, pp=pp, ep=ep) if lora_per_layer else 0
    trainable = (math.ceil(counts.num_layers / pp) * lora_per_layer if lora_per_layer
                 else stage_params(counts, tp=tp, pp=pp, ep=ep))
    params = frozen + trainable
    mixed = precision in ("bf16", "fp16")
    weight_bytes = 2 if mixed else 4
    # Gradients accumulate in fp32 (Megatron main_grad, DeepSpeed grad_accum_dtype fp32).
    grad_bytes = 4
    # Adam: exp_avg + exp_avg_sq, plus an fp32 master copy of the weights in mixed precision,
    # and also in fp32 under DeepSpeed ZeRO >= 1 (it clones its fp32 partition), while
    # Megatron's distributed optimizer works on views of fp32 parameters.
    deepspeed_zero = zero_stage >= 1 and not distributed_optimizer
    optim_bytes = 8 + (4 if mixed or deepspeed_zero else 0)
    shard_optimizer = zero_stage >= 1 or distributed_optimizer
    weights = params * weight_bytes / (dp if zero_stage >= 3 else 1)
    gradients = trainable * grad_bytes / (dp if zero_stage >= 2 else 1)
    optimizer = trainable * optim_bytes / (dp if shard_optimizer else 1)
    host_optimizer = 0.0
    if offload_optimizer:
        host_optimizer, optimizer = optimizer, 0.0

    # the weights as held (ZeRO-3: partitions) twice: reference and the swap buffer
    host_reference = 2 * weights if reference_weights else 0.0

    s, b, h = seq / cp, micro_batch * rows_per_sample, hidden
    boundary = 8 * s * b * h / (tp if sequence_parallel else 1)
    sp_split = tp if sequence_parallel else 1
    routed = moe_top_k or 1                       # MLP passes per token
    q = q_dim or h
    inside = s * b * (4 * q + 4 * kv_dim) / tp + 8 * s * b * routed * ffn / tp
    if moe_top_k:
        inside += 2 * s * b * moe_top_k * h / sp_split   # permuted tokens, to and from experts
    attention_probs = 0 if (fused_attention or recompute != "none") else 2 * heads * s * s * b / tp
    per_layer = boundary + inside + attention_probs
    if recompute == "full":
        per_layer = 2 * s * b * h / (tp if sequence_parallel else 1)
    if not mixed:
        per_layer *= 2
    layers_per_stage = counts.num_layers / pp
    in_flight = min(pp, grad_accum) if pp > 1 else 1
    interleave = 1 + (pp - 1) / (pp * vp) if vp > 1 else 1
    logits = 4 * s * b * vocab / tp
    if fused_loss:
        from apt.kernels.logit_blocks import block_shape
        rows, cols = block_shape(int(s * b), math.ceil(vocab / tp), device_type)
        logits = min(logits, 4 * rows * cols + 16 * s * b)
    activations = per_layer * layers_per_stage * in_flight * interleave + logits

    bucket = min(trainable, REDUCE_BUCKET_ELEMENTS) * 4 if dp > 1 else 0
    gathered = 2 * counts.per_layer // tp * weight_bytes if zero_stage >= 3 else 0
    all_to_all = (2 * s * b * moe_top_k * h / sp_split * weight_bytes
                  if moe_top_k and ep > 1 else 0)
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer=optimizer,
                          activations=activations, communication=bucket + gathered + all_to_all,
                          params_per_gpu=params, trainable_per_gpu=trainable,
                          host_optimizer=host_optimizer, host_reference=host_reference)


def generation_memory(*, rows: int, seq: int, layers: int, kv_dim: int, vocab: int, tp: int,
                      precision: str, kv_cache: bool = True,
                      num_iterations: int = 1, reference: bool = False) -> tuple[float, float]:
    """(sampler bytes, rollout bytes) of one GPU for GRPO (module docstring): ``rows`` = the
    rank's completions per round, ``layers`` = the layers of its pipeline stage."""
    element = 2 if precision in ("bf16", "fp16") else 4
    cache = 2 * layers * rows * seq * kv_dim / tp * element if kv_cache else 0
    logits = rows * vocab * (element + 4)
    per_token = 8 + 8 + 4 + 4 + (4 if num_iterations > 1 else 0) + (4 if reference else 0)
    return cache + logits, rows * seq * per_token


def expert_all_to_all_bytes(*, hidden: int, seq: int, micro_batch: int, grad_accum: int,
                            moe_layers: int, top_k: int, ep: int, tp: int, cp: int,
                            sequence_parallel: bool, precision: str) -> float:
    """Bytes one GPU sends per optimizer step in the expert-parallel all-to-alls: each MoE
    layer dispatches its tokens' k copies to the experts and combines them back, forward and
    backward (4 all-to-alls), keeping the 1/EP share addressed to its own experts local."""
    if ep <= 1 or not top_k:
        return 0.0
    tokens = seq / cp * micro_batch / (tp if sequence_parallel else 1)
    element = 2 if precision in ("bf16", "fp16") else 4
    per_layer = 4 * tokens * top_k * hidden * element * (ep - 1) / ep
    return per_layer * moe_layers * grad_accum
