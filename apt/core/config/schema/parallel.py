"""``training.distributed:`` (strategy, parallel degrees, ZeRO, engine, rendezvous) and
``hardware:`` (what the plan assumes about each accelerator), with the rules that tie the
degrees to the model's shape; rules that need the world size live in the parallel plan."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .rules import rule


@dataclass(frozen=True)
class DistributedConfig:
    enabled: bool = True
    # auto follows the seed README's size table; ddp = DP only, fsdp = ZeRO-3 over DP,
    # hybrid = TP x PP x DP (+EP, SP, CP) with the degrees below.
    strategy: Literal["auto", "ddp", "fsdp", "hybrid"] = "auto"
    # Expected world size; when set, a launch with another size is refused.
    world_size: Optional[int] = rule(None, gt=0)
    tensor_parallel: int = rule(1, gt=0)
    pipeline_parallel: int = rule(1, gt=0)
    virtual_pipeline_stages: int = rule(1, gt=0)
    data_parallel: Optional[int] = rule(None, gt=0)
    expert_parallel: int = rule(1, gt=0)
    context_parallel: int = rule(1, gt=0)
    sequence_parallel: bool = False
    # None lets the plan choose (0 for ddp, 3 for fsdp, 1 where pipelines forbid 2/3).
    zero_stage: Optional[int] = rule(None, ge=0, le=3)
    recompute: Literal["none", "selective", "full"] = "none"
    offload_optimizer: bool = False
    # auto: DeepSpeed ZeRO for data/tensor parallel, Megatron DDP + distributed optimizer for
    # pipeline, sequence and expert parallel (the plan says which and why).
    engine: Literal["auto", "deepspeed", "megatron"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Seconds a rank waits to reach the rendezvous store (MASTER_ADDR:MASTER_PORT) and for every
    # rank to arrive, then fails naming the address (a launcher killed at start-up, a missing
    # node) instead of waiting 30 minutes.
    rendezvous_timeout_s: float = rule(300.0, gt=0)


@dataclass(frozen=True)
class HardwareConfig:
    """What the plan assumes about each accelerator (used for memory checks, not detection)."""
    gpu_memory_gb: float = rule(80.0, gt=0)
    gpus_per_node: int = rule(8, gt=0)
    # Peak dense TFLOP/s of one device at the run's precision, for MFU. None: the table of known
    # GPUs (apt/trainops/eval/flops.py), else a measured matmul (CPU, unknown GPUs).
    peak_tflops: Optional[float] = rule(None, gt=0)
    # A run is refused before the model is built when the plan's memory estimate exceeds the
    # memory found (GPU memory; host memory on CPU). false: start anyway (the estimate is
    # pessimistic for this setup, or swap is intended).
    memory_check: bool = True


def parallel_checks(cfg):
    """The parallel degrees against the model, the data and each other."""
    m, t, d = cfg.model, cfg.training, cfg.training.distributed
    if m.num_attention_heads % d.tensor_parallel:
        yield "training.distributed.tensor_parallel", (
            f"{d.tensor_parallel} does not divide model.num_attention_heads={m.num_attention_heads}")
    elif m.kv_heads % d.tensor_parallel:
        yield "training.distributed.tensor_parallel", (
            f"{d.tensor_parallel} does not divide the {m.kv_heads} key/value heads "
            f"(model.num_query_groups)")
    stages = d.pipeline_parallel * d.virtual_pipeline_stages
    if m.num_layers % stages:
        yield "training.distributed.pipeline_parallel", (
            f"model.num_layers={m.num_layers} is not divisible by pipeline_parallel x "
            f"virtual_pipeline_stages = {d.pipeline_parallel} x {d.virtual_pipeline_stages}")
    if d.virtual_pipeline_stages > 1 and d.pipeline_parallel == 1:
        yield "training.distributed.virtual_pipeline_stages", "needs pipeline_parallel > 1"
    if d.virtual_pipeline_stages > 1 and t.eval_batches % d.pipeline_parallel:
        yield "training.eval_batches", (f"{t.eval_batches} must be a multiple of "
                                        f"pipeline_parallel={d.pipeline_parallel}: the "
                                        f"interleaved schedule needs >= PP micro-batches")
    if d.sequence_parallel and d.tensor_parallel == 1:
        yield "training.distributed.sequence_parallel", "needs tensor_parallel > 1"
    if m.num_experts and d.tensor_parallel > 1 and not d.sequence_parallel:
        # Megatron-core's MoE layer raises at the first training forward, after start-up.
        yield "training.distributed.sequence_parallel", (
            "an MoE model (model.num_experts) with tensor_parallel > 1 needs "
            "sequence_parallel: true (Megatron-core's MoE layer trains only with it)")
    if d.expert_parallel > 1:
        if m.num_experts is None:
            yield "training.distributed.expert_parallel", "needs an MoE model (model.num_experts)"
        elif m.num_experts % d.expert_parallel:
            yield "training.distributed.expert_parallel", (
                f"{d.expert_parallel} does not divide model.num_experts={m.num_experts}")
    if cfg.data.seq_length % d.context_parallel:
        yield "training.distributed.context_parallel", (
            f"{d.context_parallel} does not divide data.seq_length={cfg.data.seq_length}")
    if d.strategy in ("ddp", "fsdp") and (d.tensor_parallel > 1 or d.pipeline_parallel > 1
                                   or d.expert_parallel > 1 or d.context_parallel > 1):
        yield "training.distributed.strategy", (
            f"'{d.strategy}' takes no model parallelism; set strategy: hybrid to use "
            f"tensor/pipeline/expert/context parallel degrees")
    if d.strategy == "ddp" and d.zero_stage not in (None, 0, 1, 2):
        yield "training.distributed.zero_stage", "ddp shards no parameters: use 0, 1 or 2 (3 is fsdp)"
    if d.offload_optimizer and d.zero_stage == 0:
        yield "training.distributed.offload_optimizer", "needs ZeRO stage >= 1"
    if d.offload_optimizer and d.engine == "megatron":
        yield "training.distributed.offload_optimizer", "is a DeepSpeed ZeRO feature (engine: deepspeed)"
