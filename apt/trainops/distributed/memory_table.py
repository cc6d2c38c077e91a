"""What one GPU needs for each post-training objective, on one GPU and on a node.

``trainops plan --memory-table`` prints, for a profile's model, the plan's memory estimate
(memory.py) of four runs: full SFT, LoRA SFT, DPO and GRPO, on 1 GPU and on N (the profile's
own layout). Each row is the plan of a variant of the profile, so it is what a run of that
variant would be refused or started with:
- SFT: training.objective lm, LoRA off;
- LoRA: lm with lora.rank (16 when the profile leaves it at 0), adapters on the profile's
  targets (attention only for an MoE model: APT puts none on experts);
- DPO: the profile's training.dpo (a live reference: the frozen weights wait in host memory,
  the "host" column, and rows are pairs: twice the activations);
- GRPO: the profile's training.grpo (the sampler's KV cache and logits instead of activations
  while it samples, the round's rollouts, and with beta > 0 the reference in host memory).
One GPU runs data parallel on one rank (strategy ddp) whatever the profile's layout; the
recompute setting, micro-batch and global batch stay the profile's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from apt.core.config import APTConfig, ConfigError
from apt.core.config.schema import DistributedConfig
from .memory import GIB
from .plan import Plan, make_plan

DEFAULT_LORA_RANK = 16
OBJECTIVES = ("SFT", "LoRA", "DPO", "GRPO")


@dataclass(frozen=True)
class Row:
    objective: str
    gpus: int
    plan: Plan | None
    refused: str = ""        # why the plan refuses this variant (then plan is None)


def objective_config(cfg: APTConfig, objective: str) -> APTConfig:
    """The profile as a run of ``objective`` (one of OBJECTIVES) would be configured."""
    t, no_lora = cfg.training, replace(cfg.lora, rank=0)
    if objective == "SFT":
        return replace(cfg, training=replace(t, objective="lm"), lora=no_lora)
    if objective == "LoRA":
        targets = cfg.lora.targets
        if cfg.model.num_experts:
            targets = [x for x in targets if x in ("linear_qkv", "linear_proj")]
        lora = replace(cfg.lora, rank=cfg.lora.rank or DEFAULT_LORA_RANK, targets=targets)
        return replace(cfg, training=replace(t, objective="lm"), lora=lora)
    if objective == "DPO":
        return replace(cfg, training=replace(t, objective="dpo"), lora=no_lora)
    if objective == "GRPO":
        return replace(cfg, training=replace(t, objective="grpo"), lora=no_lora)
    raise ValueError(f"unknown objective {objective!r}")


def one_gpu(cfg: APTConfig) -> APTConfig:
    """The profile on a single GPU: no model parallelism, the plan picks the sharding."""
    d = cfg.training.distributed
    single = DistributedConfig(strategy="ddp", recompute=d.recompute, engine=d.engine)
    return replace(cfg, training=replace(cfg.training, distributed=single))


def memory_table(cfg: APTConfig, gpu_counts=(1, 8), device_type: str = "cuda") -> list[Row]:
    rows = []
    for objective in OBJECTIVES:
        variant = objective_config(cfg, objective)
        for gpus in gpu_counts:
            run = one_gpu(variant) if gpus == 1 else variant
            try:
                plan = make_plan(run, gpus, min(gpus, cfg.hardware.gpus_per_node), device_type)
            except ConfigError as err:
                rows.append(Row(objective, gpus, None, refused=str(err)))
                continue
            rows.append(Row(objective, gpus, plan))
    return rows


def _layout(p: Plan) -> str:
    parts = [f"TP{p.tp}"] if p.tp > 1 else []
    parts += [f"PP{p.pp}"] if p.pp > 1 else []
    parts += [f"EP{p.ep}"] if p.ep > 1 else []
    parts += [f"DP{p.dp}", "SP"] if p.sequence_parallel else [f"DP{p.dp}"]
    sharding = ("dist-opt" if p.distributed_optimizer else
                f"ZeRO-{p.zero_stage}" if p.engine == "deepspeed" else "DDP")
    return " ".join(parts + [sharding])


def format_memory_table(cfg: APTConfig, rows: list[Row]) -> str:
    budget = cfg.hardware.gpu_memory_gb
    head = (f"{'objective':9s} {'GPUs':>4s}  {'layout':20s} {'weights':>7s} {'grads':>6s} "
            f"{'optim':>6s} {'activ':>6s} {'comm':>5s} {'sample':>6s} {'total':>7s}  "
            f"{'host':>5s}  fits {budget:g} GiB")
    lines = [f"memory per GPU in GiB (seq {cfg.data.seq_length}, global batch "
             f"{cfg.training.batch_size}; LoRA rank {cfg.lora.rank or DEFAULT_LORA_RANK}; "
             f"GRPO: {cfg.training.grpo.num_generations} completions per prompt, "
             f"beta {cfg.training.grpo.beta:g})", head]
    for r in rows:
        if r.plan is None:
            lines.append(f"{r.objective:9s} {r.gpus:>4d}  refused: {r.refused}")
            continue
        m = r.plan.memory.as_gib()
        sample = f"{m['generation']:6.2f}" if r.plan.memory.generation else f"{'-':>6s}"
        host = m["host_reference"] + m["host_optimizer"]
        fits = "yes" if r.plan.memory.total <= budget * GIB else "NO"
        lines.append(f"{r.objective:9s} {r.gpus:>4d}  {_layout(r.plan):20s} {m['weights']:7.2f} "
                     f"{m['gradients']:6.2f} {m['optimizer']:6.2f} {m['activations']:6.2f} "
                     f"{m['communication']:5.2f} {sample} {m['total']:7.2f}  {host:5.2f}  {fits}")
    lines.append("total = weights + grads + optim + rollouts + max(activ + comm, sample): GRPO "
                 "samples (KV cache + logits) between training passes; host = a frozen "
                 "reference (DPO live, GRPO beta > 0) and offloaded optimizer state")
    return "\n".join(lines)
