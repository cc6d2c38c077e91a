"""Step time of a layout: the layer compute (compute.py), the collectives (comms.py) and the
pipeline schedule put together, with every term kept for the breakdown.

One step on the slowest (last) pipeline stage:
  micro-batch  = layers/PP x (layer compute + recompute + exposed TP/CP/EP communication)
                 + logits (last stage)
  pipeline     = (m + (PP-1)/VP) x micro-batch     (1F1B; the bubble is (PP-1)/VP of them)
  step         = pipeline + exposed p2p + exposed DP/ZeRO communication + optimizer step
                 + overlap contention + the host's per-step overhead
The host's framework time (Python, autograd, op dispatch) is a Hardware property: measured on a
CPU, where it adds to the compute; on a GPU it runs ahead of the device and shows only where a
layer's host time exceeds its device time.
Overlap rules: TP collectives hide behind the layer's GEMMs only with tp_overlap (Transformer
Engine's userbuffers); CP's KV ring hides behind attention; the gradient reduce-scatter /
all-reduce hides behind the last micro-batch's backward and the parameter all-gather behind the
first one's forward (Megatron overlap_grad_reduce / overlap_param_gather) except the last /
first bucket; FSDP's gathers and reduce-scatters hide behind each micro-batch's compute except
the first layer's gathers and the last one's reduce-scatter. Pipeline p2p and EP all-to-alls
are exposed. Hidden communication still costs the SMs its kernels hold (overlap contention).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import comms
from .compute import ELEMENT_BYTES, LayerCompute, layer_compute, logits_time
from .hardware import Hardware
from .shape import Layout, ModelShape


# Composer's DecoupledAdamW (a layout's `optimizer: decoupled_adamw`; composer/optim/
# decoupled_weight_decay.py, the same ops in v0.13.4 and v0.16), one parameter tensor at a time
# with unfused in-place ops on fp32 tensors, weight_decay 0 (llm-foundry's MPT yamls; otherwise
# param.mul_ adds 8): exp_avg.mul_ (r4 w4) .add_(grad) (r8 w4); exp_avg_sq.mul_ (r4 w4)
# .addcmul_(grad, grad) (r8 w4); denom = exp_avg_sq.sqrt() (r4 w4) / sqrt(bc2) (r4 w4)
# .add_(eps) (r4 w4); param.addcdiv_(exp_avg, denom) (r12 w4): 80; plus Composer's
# gradient_clipping (norm), which calls FSDP's clip_grad_norm_ (torch 2.1): a vector_norm per
# gradient (r4) and grad.mul_(clip_coef) (r4 w4): 12. Total 92.
DECOUPLED_ADAMW_BYTES = 92


def optimizer_bytes_per_param(lay: Layout) -> float:
    """HBM bytes the optimizer step moves per parameter it owns, pass by pass as Megatron's
    mixed-precision optimizers run them (Float16OptimizerWithFloat16Params.step in
    megatron/optimizer/optimizer.py of 2021-22, MixedPrecisionOptimizer.step in
    megatron/core/optimizer/optimizer.py): fused Adam reads the fp32 param, grad, m and v
    and writes param, m and v (28); the gradient norm reads the grads again (4); a 16-bit
    model's weights are copied back from the fp32 master (read 4, write 2 or 1); 16-bit
    gradients are first cast to fp32 main grads (``.float()``: read, write 4); fp16 unscales
    the main grads and checks them for inf/nan (read and write 4: bf16 has no loss scale)."""
    if lay.optimizer == "decoupled_adamw":
        return DECOUPLED_ADAMW_BYTES
    e = ELEMENT_BYTES[lay.dtype]
    total = 28 + 4
    if e < 4:
        total += 4 + e
        if lay.grad_bytes < 4:
            total += lay.grad_bytes + 4
    if lay.dtype == "fp16":
        total += 8
    return total


def _predivide_factor(world: int) -> int:
    """torch FSDP's gradient pre-division factor (default_hooks.DefaultState.
    _get_gradient_predivide_factor): the power of 2 nearest sqrt(world) from below; the rest
    of 1/world is divided after the reduce-scatter."""
    factor = 1
    while world % factor == 0 and world / factor > factor:
        factor *= 2
    return factor


def fsdp1_gradient_bytes(params: float, group: int, lay: Layout) -> float:
    """HBM bytes one GPU moves per micro-batch on torch FSDP1's gradient path, besides the
    collectives, for ``params`` parameters (this GPU's layers, unsharded) sharded over
    ``group`` ranks (torch 2.1, torch/distributed/fsdp):
    - the FlatParameter's views are torch.split slices of it (flat_param.py
      _get_unflat_views_aligned), so autograd's SplitWithSizesBackward cats every weight
      gradient into one flat gradient: read + write at the compute dtype;
    - _post_backward_hook casts that unsharded gradient to the reduce dtype when they differ
      (mixed precision with reduce fp32, Composer's DEFAULT): read e, write grad_bytes;
    - _reduce_grad divides it in place by the pre-divide factor before the reduce-scatter
      (read + write at grad_bytes) and the shard by the post-divide factor after;
    - each unshard (forward and backward) first casts the fp32 local shard to the compute
      dtype (_use_low_precision_shard): read 4, write e, on the shard."""
    e, g = ELEMENT_BYTES[lay.dtype], lay.grad_bytes
    pre = _predivide_factor(group)
    unsharded = 2 * e + (e + g if g != e else 0) + (2 * g if pre > 1 else 0)
    sharded = (2 * g if group / pre > 1 else 0) + 2 * (4 + e)
    return params * (unsharded + sharded / group)


@dataclass(frozen=True)
class Prediction:
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    breakdown: dict            # seconds per step, by term
    overlapped: dict = field(default_factory=dict)   # communication hidden behind compute
    bubble_without_vp_s: float = 0.0

    def describe(self) -> str:
        lines = [f"step         {self.step_s:.3f} s, {self.tokens_per_s_per_gpu:,.0f} tokens/s "
                 f"per GPU, MFU {self.mfu:.1%}"]
        for name, secs in self.breakdown.items():
            hidden = self.overlapped.get(name)
            extra = f" (+{hidden:.3f} s overlapped)" if hidden else ""
            lines.append(f"  {name:24s} {secs:9.3f} s {secs / self.step_s:6.1%}{extra}")
        if self.bubble_without_vp_s:
            lines.append(f"  {'(pp bubble without VP)':24s} {self.bubble_without_vp_s:9.3f} s")
        return "\n".join(lines)


def _dp_params(shape: ModelShape, lay: Layout) -> tuple[float, float]:
    """(dense, expert) parameters one GPU of the last stage holds before ZeRO sharding."""
    per_stage = shape.layers / lay.pp
    dense = per_stage * (shape.attention_params + (0 if shape.moe else shape.expert_params)
                         + 2 * shape.hidden + shape.hidden * shape.experts) / lay.tp
    dense += shape.vocab * shape.hidden / lay.tp * (1 if lay.pp > 1 else 2)
    expert = per_stage * shape.expert_params / (lay.tp * lay.ep) if shape.moe else 0.0
    return dense, expert


def _recompute_time(c: LayerCompute, recompute: str) -> float:
    """Forward work redone in the backward, per layer and micro-batch: the whole forward
    (full), or the selective modules (Megatron-core recompute_modules; "selective" alone is
    its default, core_attn)."""
    if recompute in ("none", "full"):
        return c.forward if recompute == "full" else 0.0
    modules = {"core_attn"} if recompute == "selective" else set(recompute.split("+"))
    return (c.attention_fwd * ("core_attn" in modules) + c.norm_fwd * ("layernorm" in modules)
            + c.moe_act_fwd * ("moe_act" in modules))


def predict(shape: ModelShape, lay: Layout, hw: Hardware, fused_attention: bool = True
            ) -> Prediction:
    gpn, tp, cp, pp, m = lay.gpus_per_node, lay.tp, lay.cp, lay.pp, lay.grad_accum
    e = ELEMENT_BYTES[lay.dtype]
    c = layer_compute(shape, lay, hw, fused_attention)
    tokens = lay.micro_batch * shape.seq / cp

    # Tensor parallel: per layer 2 all-reduces forward and 2 backward (SP: all-gather +
    # reduce-scatter pairs, the same bytes); full recompute repeats the forward's. SP keeps
    # only its sequence shard of each column-parallel layer's input for the backward and
    # all-gathers it again there (Korthikanti et al. 2022, section 4.2.2; Megatron's
    # LinearWithGradAccumulationAndAsyncCommunication.backward, Transformer Engine's
    # LayerNormLinear likewise): two more all-gathers per layer, one all-reduce's bytes.
    act = tokens * shape.hidden * e
    tp_one = comms.all_reduce(act, tp, 1, hw, gpn)
    tp_layer = tp_one * (4 + (2 if lay.recompute == "full" else 0) + (1 if lay.sp else 0))
    tp_hidden = min(tp_layer, c.gemm_fwd + c.gemm_bwd) if lay.tp_overlap else 0.0
    # Context parallel ring: (CP-1) K/V blocks forward, K/V and their gradients backward.
    kv = tokens * 2 * shape.kv_dim / tp * e
    cp_layer = 3 * (cp - 1) * comms.p2p(kv, tp, hw, gpn) if cp > 1 else 0.0
    cp_hidden = min(cp_layer, c.attention_fwd + c.attention_bwd)
    # Expert parallel: dispatch + combine, forward and backward, top-k copies of each token.
    ep_layer = 0.0
    if shape.moe and lay.ep > 1:
        routed = tokens / (tp if lay.sp else 1) * shape.top_k * shape.hidden * e
        ep_layer = 4 * comms.all_to_all(routed, lay.ep, tp * cp, hw, gpn)
    recompute = _recompute_time(c, lay.recompute)
    stream = hw.hbm_bytes_s * hw.hbm_fraction

    # Data parallel / ZeRO over DP x CP ranks (CP ranks hold the same weights). Expert weights
    # are replicated over the expert-data-parallel group: the ranks holding the same experts,
    # EP ranks apart (Megatron-core's expert rank order tp-ep-dp-pp), so with EP filling a node
    # that group crosses nodes even where the dense DP group does not.
    dense, expert = _dp_params(shape, lay)
    group, edp = lay.dp * cp, max(1, lay.dp * cp // lay.ep)
    # Without gradient-accumulation fusion the weight-gradient GEMM writes a fresh gradient
    # and a separate kernel adds it to the accumulator, every micro-batch after the first
    # (autograd's AccumulateGrad into .grad, or Megatron-LM's main_grad hook): read the new
    # gradient, read and write the accumulator (in the dtype gradients are reduced in), for
    # every parameter the GPU holds (its shard with ZeRO-2/3).
    held = (dense / group + expert / edp) if lay.zero >= 2 else dense + expert
    accumulate = 0.0
    if not lay.grad_accum_fusion and m > 1:
        accumulate = (m - 1) / m * held * (e + 2 * lay.grad_bytes) / stream

    layers = shape.layers / pp
    per_mb = {"gemm": layers * (c.gemm_fwd + c.gemm_bwd),
              "attention": layers * (c.attention_fwd + c.attention_bwd),
              "elementwise": layers * (c.elementwise_fwd + c.elementwise_bwd),
              "recompute": layers * recompute,
              "logits + loss": logits_time(shape, lay, hw),
              "tp comm exposed": layers * (tp_layer - tp_hidden),
              "cp comm exposed": layers * (cp_layer - cp_hidden),
              "ep all-to-all": layers * ep_layer,
              "grad accumulation": accumulate}
    # The host's framework time per layer: serial on a CPU (the host is the device), hidden
    # behind the device's queue on a GPU except where it exceeds the device's own time.
    host = layers * hw.host_layer_s
    per_mb["host framework"] = host if hw.host_serial else max(0.0, host - sum(per_mb.values()))
    t_mb = sum(per_mb.values())
    bubble = (pp - 1) / lay.vp * t_mb
    breakdown = {k: v * m for k, v in per_mb.items()}
    breakdown["pp bubble"] = bubble
    overlapped = {"tp comm exposed": layers * tp_hidden * m,
                  "cp comm exposed": layers * cp_hidden * m}

    # Pipeline p2p: activations forward, their gradients backward, per micro-batch and per
    # model chunk (the interleaved schedule crosses VP x more stage boundaries). Exposed:
    # Megatron-core overlaps p2p with compute only with overlap_p2p_comm, False by default
    # (megatron/core/model_parallel_config.py).
    if pp > 1:
        # With SP the activation is already split over TP; Megatron-LM 2021's scatter/gather
        # sent 1/TP per rank too and all-gathered it over NVLink on arrival.
        split = tp if lay.sp or lay.p2p_split else 1
        one = comms.p2p(act / split, tp * cp * lay.dp, hw, gpn)
        if lay.p2p_split and not lay.sp:
            one += comms.all_gather(act, tp, 1, hw, gpn)
        sends = 2 * m * lay.vp
        breakdown["pp p2p"] = sends * one

    # Data parallel / ZeRO: the groups above, their ranks TP (dense) and TP x EP (expert) apart.
    stride, estride = tp, tp * lay.ep
    groups = ((dense, group, stride), (expert, edp, estride))
    grads = lambda n, g: lay.grad_bytes * n     # noqa: E731  (bytes of n gradients)
    if lay.zero >= 3:
        mb_comm = sum(2 * comms.all_gather(n * e, g, st, hw, gpn)
                      + comms.reduce_scatter(grads(n, g), g, st, hw, gpn)
                      for n, g, st in groups)
        # FSDP gathers layer by layer, one ahead: the first layer's gather of each pass and
        # the last layer's reduce-scatter have no compute to hide behind (one layer's share).
        first_last = mb_comm / max(1.0, layers)
        hidden = min(mb_comm - first_last, t_mb) if lay.dp_overlap else 0.0
        dp_total, dp_hidden = mb_comm * m, hidden * m
    else:
        reduce = comms.all_reduce if lay.zero == 0 else comms.reduce_scatter
        grad_comm = sum(reduce(grads(n, g), g, st, hw, gpn) for n, g, st in groups)
        gather = 0.0 if lay.zero == 0 else sum(comms.all_gather(n * e, g, st, hw, gpn)
                                               for n, g, st in groups)
        backward = layers * (c.gemm_bwd + c.attention_bwd + c.elementwise_bwd)
        forward = layers * c.forward
        # Megatron reduces gradients bucket by bucket as the backward produces them; the last
        # bucket (the first layers' gradients) is produced when the backward ends, so its
        # reduce is exposed, as is the gather of the first bucket of parameters. Bucket size:
        # Megatron-core's default max(40M, 1M x DP) parameters
        # (megatron/core/distributed/distributed_data_parallel.py).
        last = min(1.0, max(40e6, 1e6 * group) / max(1.0, dense + expert))
        dp_hidden = (min(grad_comm * (1 - last), backward)
                     + min(gather * (1 - last), forward)) if lay.dp_overlap else 0.0
        dp_total = grad_comm + gather
    breakdown["dp/zero comm exposed"] = dp_total - dp_hidden
    overlapped["dp/zero comm exposed"] = dp_hidden

    # torch FSDP1's copies and casts of each micro-batch's gradients. The cat runs in the
    # backward on the compute stream; the cast and the divisions on FSDP's post-backward stream
    # beside the next layer's backward. Those are HBM-bound kernels that need the SMs and the
    # bandwidth they stream with while they run, so they are counted at their streaming time,
    # not hidden like a collective (which holds only comm_sms).
    if lay.fsdp1 and lay.zero >= 3:
        breakdown["fsdp1 grad copies"] = m * sum(
            fsdp1_gradient_bytes(n, g, lay) for n, g, _ in groups if n) / stream

    sharded = lambda n, g: n / g if lay.zero >= 1 else n   # noqa: E731
    opt_params = sharded(dense, group) + sharded(expert, edp)
    breakdown["optimizer step"] = opt_params * optimizer_bytes_per_param(lay) / stream

    # Overlap is not free: while a collective runs beside compute its kernels hold SMs the
    # GEMMs cannot use. DeepSeek-V3 (arXiv 2412.19437, section 3.2.2) needed 20 SMs of an
    # H800's 132 to saturate IB and NVLink; the compute behind hidden communication runs
    # that much slower (hardware.yaml comm_sms).
    hidden_comm = sum(overlapped.values())
    breakdown["overlap contention"] = (hidden_comm * hw.comm_sms / hw.sms
                                       if hw.sms and hw.comm_sms else 0.0)

    breakdown["host step overhead"] = hw.host_step_s
    step = sum(breakdown.values())
    tokens_per_s = lay.global_batch * shape.seq / step / lay.world
    mfu = tokens_per_s * shape.model_flops_per_token() / hw.peak(lay.dtype)
    return Prediction(step_s=step, tokens_per_s_per_gpu=tokens_per_s, mfu=mfu,
                      breakdown=breakdown, overlapped={k: v for k, v in overlapped.items() if v},
                      bubble_without_vp_s=(pp - 1) * t_mb if lay.vp > 1 else 0.0)
