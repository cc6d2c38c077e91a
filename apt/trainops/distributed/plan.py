"""The parallel plan: a pure function of (config, world size, GPUs per node, device type).

It decides the strategy, every parallel degree, the ZeRO stage / optimizer sharding and the
engine, the micro-batch and accumulation, and estimates memory per GPU. Everything downstream
reads these numbers from the plan instead of re-deriving them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from apt.core.config import APTConfig, ConfigError
from apt.core.config.sizing import (attention_widths, count_lora_parameters, count_parameters,
                              expert_ffn_size)
from .memory import (GIB, MemoryEstimate, estimate_memory, expert_all_to_all_bytes,
                     generation_memory)

BILLION = 1e9
DIST = "training.distributed"


class PlanError(ConfigError):
    """A layout that cannot work for this config and cluster."""


@dataclass(frozen=True)
class Plan:
    world_size: int
    gpus_per_node: int
    device_type: str
    strategy: str            # ddp | fsdp | hybrid
    tp: int
    pp: int
    vp: int
    dp: int
    ep: int
    cp: int
    sequence_parallel: bool
    zero_stage: int
    # "deepspeed": ZeRO engine over DP ranks; "megatron": Megatron DDP + distributed optimizer
    # (pipelines, where ZeRO 2/3 cannot run).
    engine: str
    distributed_optimizer: bool
    precision: str
    recompute: str
    offload_optimizer: bool
    global_batch: int
    seq_length: int
    micro_batch: int
    grad_accum: int
    params_total: int
    params_active: int
    memory: MemoryEstimate
    notes: tuple = field(default=())
    # Bytes one GPU sends per step in MoE expert-parallel all-to-alls (0 without EP).
    expert_all_to_all: float = 0.0

    @property
    def zero3_partitioned(self) -> bool:
        """Parameters are split over DP ranks (DeepSpeed ZeRO-3): gather before reading them."""
        return self.engine == "deepspeed" and self.zero_stage == 3

    @property
    def model_parallel(self) -> bool:
        """The model itself is split over ranks (TP, PP, EP or virtual stages)."""
        return max(self.tp, self.pp, self.ep, self.vp) > 1

    @property
    def whole_model_per_rank(self) -> bool:
        """Every rank holds every weight as is: one-process reads (generation, HF export)."""
        return not self.model_parallel and not self.zero3_partitioned

    @property
    def nodes(self) -> int:
        return max(1, -(-self.world_size // self.gpus_per_node))

    @property
    def checkpoint_bytes(self) -> int:
        """One training checkpoint, all ranks' files together: per trainable parameter (all of
        them, or LoRA's adapters: a frozen base is not saved) its weight at the training
        precision, fp32 master copy and two Adam moments (checkpoints/optimizer_state.py); RNG
        states and JSON files are small. tiny: 13.4 MB estimated, 13.7 MB written."""
        trainable = self.params_total * self.memory.trainable_per_gpu / max(
            1, self.memory.params_per_gpu)
        weight_bytes = 2 if self.precision in ("bf16", "fp16") else 4
        return int(trainable * (weight_bytes + 12))

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_length

    def describe(self) -> str:
        mem = self.memory.as_gib()
        layout = f"TP={self.tp} PP={self.pp} DP={self.dp}"
        extras = [f"VP={self.vp}" if self.vp > 1 else "", f"EP={self.ep}" if self.ep > 1 else "",
                  f"CP={self.cp}" if self.cp > 1 else "", "SP" if self.sequence_parallel else ""]
        layout += "".join(f" {e}" for e in extras if e)
        sharding = (f"ZeRO-{self.zero_stage} (DeepSpeed)" if self.engine == "deepspeed" else
                    "Megatron distributed optimizer" if self.distributed_optimizer else
                    "Megatron DDP")
        lines = [
            f"world        {self.world_size} = {self.nodes} node(s) x {self.gpus_per_node} "
            f"{self.device_type.upper()}(s)/node",
            f"strategy     {self.strategy}: {layout}",
            f"sharding     {sharding}; precision {self.precision}; recompute {self.recompute}"
            + ("; optimizer offloaded to CPU" if self.offload_optimizer else ""),
            f"batch        global {self.global_batch} = micro {self.micro_batch} x accumulation "
            f"{self.grad_accum} x DP {self.dp} ({self.tokens_per_step:,} tokens/step)",
            f"parameters   {_human(self.params_total)} total, {_human(self.params_active)} "
            f"active, {_human(self.memory.params_per_gpu)} per GPU"
            + (f", {_human(self.memory.trainable_per_gpu)} trainable (LoRA)"
               if self.memory.trainable_per_gpu < self.memory.params_per_gpu else ""),
            "memory/GPU   weights {weights:.2f} GiB, gradients {gradients:.2f} GiB, optimizer "
            "{optimizer:.2f} GiB, activations {activations:.2f} GiB, communication "
            "{communication:.2f} GiB = total {total:.2f} GiB".format(**mem),
        ]
        if self.memory.generation or self.memory.rollouts:
            lines.append(f"memory/GPU   GRPO sampling {mem['generation']:.2f} GiB (KV cache + "
                         f"logits, instead of activations and buffers while it samples), "
                         f"rollouts {mem['rollouts']:.2f} GiB")
        if self.expert_all_to_all:
            lines.append(f"traffic/GPU  expert all-to-all {self.expert_all_to_all / GIB:.2f} GiB "
                         f"per step (dispatch + combine, forward + backward)")
        if self.offload_optimizer:
            lines.append(f"host memory  optimizer state {mem['host_optimizer']:.2f} GiB per rank")
        if self.memory.host_reference:
            lines.append(f"host memory  frozen reference {mem['host_reference']:.2f} GiB per "
                         f"rank (initial weights + swap buffer; DPO's reference: precomputed and "
                         f"GRPO's beta: 0 hold none while training)")
        lines += [f"note         {n}" for n in self.notes]
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def make_plan(cfg: APTConfig, world_size: int, gpus_per_node: int | None = None,
              device_type: str = "cuda") -> Plan:
    """Decide the layout; raise PlanError (naming the key) when it cannot work."""
    d, m = cfg.training.distributed, cfg.model
    gpus_per_node = gpus_per_node or min(world_size, cfg.hardware.gpus_per_node)
    if world_size < 1:
        raise PlanError(f"world size must be >= 1, got {world_size}")
    if d.world_size and d.world_size != world_size:
        raise PlanError(f"profile expects {d.world_size} processes, launched with {world_size}",
                        key=f"{DIST}.world_size")
    counts = count_parameters(m)
    notes: list[str] = []
    strategy = d.strategy
    explicit_layout = any(x > 1 for x in (d.tensor_parallel, d.pipeline_parallel,
                                          d.expert_parallel, d.context_parallel))
    if strategy == "auto" and explicit_layout:
        strategy = "hybrid"
    if strategy == "auto":
        strategy, tp, pp, ep = _auto_layout(cfg, counts, world_size, gpus_per_node, device_type)
        sp = tp > 1
        notes.append(f"strategy auto: {_human(counts.total)} parameters on {world_size} "
                     f"device(s) -> {strategy} (seed size table)")
        cp, vp = 1, 1
    else:
        tp, pp, ep, cp = d.tensor_parallel, d.pipeline_parallel, d.expert_parallel, d.context_parallel
        vp, sp = d.virtual_pipeline_stages, d.sequence_parallel
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise PlanError(f"TP x PP x CP = {tp} x {pp} x {cp} = {model_parallel} does not divide "
                        f"the world size {world_size}", key=f"{DIST}.tensor_parallel")
    dp = world_size // model_parallel
    if d.data_parallel and d.data_parallel != dp:
        raise PlanError(f"{d.data_parallel} does not match world size / (TP x PP x CP) = "
                        f"{world_size} / {model_parallel} = {dp}", key=f"{DIST}.data_parallel")
    if tp > gpus_per_node:
        notes.append(f"TP={tp} spans nodes ({gpus_per_node} GPUs/node): expect slow all-reduces")
    if ep > 1 and dp * cp % ep:
        raise PlanError(f"expert_parallel={ep} must divide DP x CP = {dp * cp}",
                        key=f"{DIST}.expert_parallel")
    if cp > 1 and device_type != "cuda":
        raise PlanError("context parallel needs CUDA with Transformer Engine (Megatron-core's "
                        "local attention has no context-parallel path)",
                        key=f"{DIST}.context_parallel")

    precision = _precision(cfg.training.precision, device_type)
    zero_stage, engine, dist_opt = _sharding(cfg, strategy, pp, ep, sp, dp, precision, notes)
    if cfg.lora.enabled and engine == "deepspeed" and zero_stage == 3:
        raise PlanError("LoRA with ZeRO-3 (strategy fsdp) is not supported: use strategy ddp "
                        "or hybrid with zero_stage 1 or 2 (adapters' optimizer state is small)",
                        key=f"{DIST}.zero_stage")
    global_batch, micro, accum = _batch(cfg, dp, pp, vp)
    if vp > 1:
        notes.append("interleaved pipeline: p2p sends run unbatched (batch_p2p_comm=False); "
                     "the batched default silently gives wrong losses on gloo")
    if sp:
        notes.append("sequence parallel: norm weights are marked sequence_parallel so their "
                     "gradients are all-reduced over TP")
    memory = _estimate(cfg, counts, device_type, micro=micro, accum=accum, tp=tp, pp=pp, vp=vp,
                       dp=dp, ep=ep, cp=cp, sp=sp, zero_stage=zero_stage, dist_opt=dist_opt)
    if device_type == "cuda" and memory.total > cfg.hardware.gpu_memory_gb * GIB:
        notes.append(f"WARNING: estimated {memory.total / GIB:.1f} GiB per GPU exceeds "
                     f"hardware.gpu_memory_gb={cfg.hardware.gpu_memory_gb:g}")
    return Plan(world_size=world_size, gpus_per_node=gpus_per_node, device_type=device_type,
                strategy=strategy, tp=tp, pp=pp, vp=vp, dp=dp, ep=ep, cp=cp,
                sequence_parallel=sp, zero_stage=zero_stage, engine=engine,
                distributed_optimizer=dist_opt, precision=precision, recompute=d.recompute,
                offload_optimizer=d.offload_optimizer, global_batch=global_batch,
                seq_length=cfg.data.seq_length, micro_batch=micro, grad_accum=accum,
                params_total=counts.total, params_active=counts.active, memory=memory,
                notes=tuple(notes), expert_all_to_all=expert_all_to_all_bytes(
                    hidden=m.hidden_size, seq=cfg.data.seq_length, micro_batch=micro,
                    grad_accum=accum, moe_layers=m.num_layers // pp, top_k=_top_k(m), ep=ep,
                    tp=tp, cp=cp, sequence_parallel=sp, precision=precision))


def _auto_layout(cfg, counts, world_size, gpus_per_node, device_type):
    """The seed README's table: <1B DDP, 1-7B FSDP, 7-30B FSDP+PP, 30-100B +TP, >100B +EP.

    Within a row, the smallest model-parallel degrees whose memory estimate fits are chosen.
    """
    n = counts.total
    if n < 1 * BILLION or world_size == 1:
        return "ddp", 1, 1, 1
    if n < 7 * BILLION:
        return "fsdp", 1, 1, 1
    m = cfg.model
    tps = [1]
    if n >= 30 * BILLION:
        tps = [t for t in (8, 4, 2) if t <= gpus_per_node and m.num_attention_heads % t == 0
               and m.kv_heads % t == 0 and world_size % t == 0] or [1]
    ep = 1
    if m.num_experts and n >= 100 * BILLION:
        ep = max(e for e in (1, 2, 4, 8) if m.num_experts % e == 0 and e <= world_size)
    budget = cfg.hardware.gpu_memory_gb * GIB
    fallback = None
    for tp in tps:
        for pp in (2, 4, 8, 16, 32):
            if m.num_layers % pp or world_size % (tp * pp) or (world_size // (tp * pp)) % ep:
                continue
            dp = world_size // (tp * pp)
            try:
                _, micro, accum = _batch(cfg, dp, pp, 1)
            except PlanError:
                continue
            mem = _estimate(cfg, counts, device_type, micro=micro, accum=accum, tp=tp, pp=pp,
                            vp=1, dp=dp, ep=ep, cp=1, sp=tp > 1, zero_stage=1, dist_opt=True)
            fallback = fallback or (tp, pp)
            if mem.total <= budget:
                return "hybrid", tp, pp, ep
    if fallback is None:
        raise PlanError(f"no pipeline layout divides {m.num_layers} layers over {world_size} "
                        f"devices; set {DIST}.strategy and the degrees explicitly",
                        key=f"{DIST}.strategy")
    return "hybrid", fallback[0], fallback[1], ep


def _estimate(cfg, counts, device_type, *, micro, accum, tp, pp, vp, dp, ep, cp, sp, zero_stage,
              dist_opt) -> MemoryEstimate:
    m, d = cfg.model, cfg.training.distributed
    q_dim, kv_dim = attention_widths(m)
    precision = _precision(cfg.training.precision, device_type)
    memory = estimate_memory(
        counts, hidden=m.hidden_size, ffn=expert_ffn_size(m), kv_dim=kv_dim, q_dim=q_dim,
        heads=m.num_attention_heads, vocab=m.vocab_size, seq=cfg.data.seq_length,
        micro_batch=micro, grad_accum=accum, tp=tp, pp=pp, vp=vp, dp=dp, ep=ep, cp=cp,
        sequence_parallel=sp, zero_stage=zero_stage, distributed_optimizer=dist_opt,
        precision=precision, recompute=d.recompute,
        offload_optimizer=d.offload_optimizer, fused_attention=device_type == "cuda",
        lora_per_layer=count_lora_parameters(m, cfg.lora, tp=tp)[1],
        rows_per_sample=2 if cfg.training.objective == "dpo" else 1,
        reference_weights=_holds_reference(cfg), moe_top_k=_top_k(m),
        fused_loss=_fused_loss(cfg), device_type=device_type)
    if cfg.training.objective != "grpo":
        return memory
    grpo = cfg.training.grpo
    generation, rollouts = generation_memory(
        rows=cfg.training.batch_size // dp, seq=cfg.data.seq_length,
        layers=-(-m.num_layers // pp), kv_dim=kv_dim, vocab=m.vocab_size, tp=tp,
        precision=precision, kv_cache=grpo.kv_cache, num_iterations=grpo.num_iterations,
        reference=grpo.beta > 0)
    return replace(memory, generation=generation, rollouts=rollouts)


def _fused_loss(cfg) -> bool:
    """Whether the loss comes from the fused linear + cross-entropy kernel: next-token losses
    take the model's labels path (apt/model/fused_output.py); DPO and GRPO need log-probs
    from the logits. ``auto`` counts as on: a GPU node builds the kernel."""
    kernels = cfg.model.kernels
    wanted = kernels == "auto" or (kernels != "none" and "linear_cross_entropy" in kernels)
    return wanted and cfg.training.objective == "lm"


def _top_k(m) -> int:
    """Experts per token of an MoE model, 0 for a dense one."""
    return m.moe_top_k if m.num_experts else 0


def _holds_reference(cfg) -> bool:
    """Preference training keeps the frozen initial weights in host memory for a live
    reference pass (precomputed: only while precomputing; SimPO: never), and so does GRPO with
    a KL penalty (beta > 0)."""
    dpo = cfg.training.dpo
    if cfg.training.objective == "grpo":
        return cfg.training.grpo.beta > 0
    return (cfg.training.objective == "dpo" and dpo.loss_type != "simpo"
            and dpo.reference == "live")


def _sharding(cfg, strategy, pp, ep, sp, dp, precision, notes):
    """The one place that picks the engine and how optimizer state is sharded.

    DeepSpeed ZeRO runs data and tensor parallel layouts. Pipelines (DeepSpeed refuses ZeRO
    2/3 with them and cannot drive Megatron's schedules), sequence-parallel norms and Megatron
    expert parallel need Megatron's engine: DDP + distributed optimizer (ZeRO-1-like)."""
    d = cfg.training.distributed
    requested, key = d.zero_stage, f"{DIST}.zero_stage"
    reasons = [why for cond, why in ((pp > 1, "pipeline parallel"),
                                     (sp, "sequence parallel"),
                                     (ep > 1, "expert parallel")) if cond]
    if d.engine == "deepspeed" and reasons:
        raise PlanError(f"the DeepSpeed engine cannot run {' + '.join(reasons)} with Megatron "
                        f"layers; use engine: megatron (or auto)", key=f"{DIST}.engine")
    if d.engine == "megatron" or reasons:
        if d.offload_optimizer:
            raise PlanError(f"optimizer offload is a DeepSpeed ZeRO feature; "
                            f"{' + '.join(reasons) or 'engine megatron'} runs on Megatron's "
                            f"engine", key=f"{DIST}.offload_optimizer")
        if requested in (2, 3):
            raise PlanError(f"ZeRO-{requested} cannot be combined with "
                            f"{' + '.join(reasons) or 'the Megatron engine'}; use zero_stage 0 "
                            f"or 1 (1 = Megatron distributed optimizer)", key=key)
        dist_opt = requested != 0
        notes.append(f"engine megatron ({', '.join(reasons) or 'requested'}): Megatron DDP"
                     + (" + distributed optimizer (optimizer state sharded over DP, like "
                        "ZeRO-1)" if dist_opt else ""))
        return (1 if dist_opt else 0), "megatron", dist_opt
    # ddp defaults to ZeRO-1: the same communication volume as an all-reduce (reduce-scatter +
    # all-gather) with optimizer state sharded over DP. With one data-parallel rank in fp32
    # there is nothing to shard, and ZeRO-1 would only add a flat fp32 copy of every weight
    # that each step copies gradients into and weights out of (issue 14: a tenth of a CPU step
    # at 60M parameters): ZeRO-0 there. bf16 keeps ZeRO-1 for its fp32 gradient accumulation.
    default = {"ddp": 1, "fsdp": 3, "hybrid": 1}[strategy]
    if default == 1 and dp == 1 and precision == "fp32":
        default = 0
    stage = default if requested is None else requested
    if strategy == "fsdp" and stage != 3:
        raise PlanError(f"fsdp means fully sharded parameters (ZeRO-3), got zero_stage {stage}",
                        key=key)
    return stage, "deepspeed", False


def _precision(requested: str, device_type: str) -> str:
    if requested == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise PlanError("fp16 needs a GPU (DeepSpeed: 'Type fp16 is not supported' on CPU); "
                        "use fp32 or bf16", key="training.precision")
    return requested


def _batch(cfg, dp, pp, vp):
    t = cfg.training
    if t.batch_size % dp:
        raise PlanError(f"global batch {t.batch_size} is not divisible by data-parallel size "
                        f"{dp}", key="training.batch_size")
    per_rank = t.batch_size // dp
    # micro_batch_size is the largest micro-batch a rank may take (what fits in memory): on
    # more ranks the per-rank batch shrinks and the largest divisor not above it is used.
    limit = min(t.micro_batch_size or per_rank, per_rank)
    micro = max(m for m in range(1, limit + 1) if per_rank % m == 0)
    accum = per_rank // micro
    if vp > 1 and accum % pp:
        raise PlanError(f"interleaved pipeline needs micro-batches per step ({accum}) divisible "
                        f"by pipeline_parallel={pp}", key="training.micro_batch_size")
    return t.batch_size, micro, accum
