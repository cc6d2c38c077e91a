"""Wrap a model for its plan: the one place that turns the plan into an engine.

Today: DeepSpeed ZeRO 0-3 with Megatron's groups passed as ``mpu`` (ZeRO shards over the
data-parallel group only). Pipelines (``plan.engine == "megatron"``) need Megatron's schedules
and distributed optimizer and are refused until that engine lands.
"""
from __future__ import annotations

import logging

import torch

from apt.core.config import APTConfig
from .plan import Plan, PlanError
from .memory import REDUCE_BUCKET_ELEMENTS
from .mpu_adapter import MegatronMPU

log = logging.getLogger(__name__)


def deepspeed_config(cfg: APTConfig, plan: Plan) -> dict:
    t = cfg.training
    zero = {"stage": plan.zero_stage, "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
            "allgather_bucket_size": REDUCE_BUCKET_ELEMENTS}
    if plan.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": plan.device_type == "cuda"}
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.learning_rate, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
            "weight_decay": t.weight_decay,
            # torch's AdamW needs no compiled op; offload needs DeepSpeed's CPUAdam.
            "torch_adam": not plan.offload_optimizer}},
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if plan.precision == "bf16" and plan.zero_stage >= 1:
        # Accumulate gradients in fp32 (only possible with ZeRO >= 1, FEASIBILITY.md).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-D tensors), the usual LLM recipe."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg: APTConfig, plan: Plan, lr_lambda):
    """Return (engine, optimizer, scheduler). ``lr_lambda(step) -> multiplier`` of the base lr."""
    if plan.engine != "deepspeed":
        raise PlanError("pipeline parallel needs the Megatron engine (schedules + distributed "
                        "optimizer), which this version does not run yet; use pipeline_parallel "
                        "1", key="training.distributed.pipeline_parallel")
    import deepspeed
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, cfg.training.weight_decay),
        config=deepspeed_config(cfg, plan), mpu=MegatronMPU(),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    return engine, optimizer, scheduler
