"""DeepSpeed ZeRO 0-3 over the data-parallel group, with Megatron's groups as ``mpu``.

Handles data parallel and tensor parallel (TP-sharded params carry ``tensor_model_parallel``,
so DeepSpeed's gradient norm is right). Layouts DeepSpeed cannot reduce correctly (pipelines,
sequence-parallel norms, Megatron expert parallel) go to the Megatron engine: see
``engines.select``. An MoE model's router gets the aux-loss gradient scale and expert-bias
update Megatron's schedules give it (``moe_router_steps``)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from apt.core.config import APTConfig
from apt.trainops.checkpoints.loss_scale import (deepspeed_scaler_state,
                                                 load_deepspeed_scaler_state)
from ..grad_clip import clip_by_global_norm
from ..memory import REDUCE_BUCKET_ELEMENTS
from ..mpu_adapter import MegatronMPU
from ..plan import Plan
from apt.trainops.reliability.watchdog import set_phase
from . import moe_router_steps
from .base import (StepResult, TrainEngine, optimizer_state_bytes, tensor_bytes,
                   updates_dropped)


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
        # ZeRO-0 fp32: APT clips (grad_clip.py), since DeepSpeed's clipping there drops the norm
        "gradient_clipping": 0.0 if clips_itself(plan) else t.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.learning_rate, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
            "weight_decay": t.weight_decay,
            # torch's AdamW needs no compiled op; offload needs DeepSpeed's CPUAdam.
            "torch_adam": not plan.offload_optimizer,
            **_fused_adamw(plan)}},
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if plan.precision == "bf16" and plan.zero_stage >= 1:
        # Accumulate gradients in fp32 (only possible with ZeRO >= 1, FEASIBILITY.md).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def clips_itself(plan: Plan) -> bool:
    """ZeRO-0 in fp32: DeepSpeed steps a plain torch optimizer, which reports no gradient
    norm; ZeRO 1-3 and the bf16/fp16 optimizers compute, report and clip it themselves."""
    return plan.zero_stage == 0 and plan.precision == "fp32"


def _fused_adamw(plan: Plan) -> dict:
    """torch AdamW's fused kernel on CPU (DeepSpeed passes the key through to the optimizer).

    WHY: without it torch picks the single-tensor loop on CPU (foreach is CUDA-only by
    default): about ten full passes over the weights per step, each allocating temporaries.
    Measured on 2 threads (CPU ms per step, 7M / 58M fp32 params): 44.8 / 479.5 single-tensor,
    8.4 / 49.5 fused; the Hugging Face Trainer uses the fused one by default (issue 14,
    bench/peer_hf.py). Not set on CUDA, where it was not measured here."""
    if plan.offload_optimizer or plan.device_type != "cpu":
        return {}
    return {"fused": True}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-D tensors), as Megatron's optimizer does."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class DeepSpeedEngine(TrainEngine):
    kind = "deepspeed"
    def __init__(self, modules: list[torch.nn.Module], cfg: APTConfig, plan: Plan, objective):
        import deepspeed
        (model,) = modules
        self.plan, self.objective = plan, objective
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, cfg.training.weight_decay),
            config=deepspeed_config(cfg, plan), mpu=MegatronMPU())
        self.modules = [self.engine.module]
        self.moe = moe_router_steps.is_moe(self.modules)
        self.grad_clip = cfg.training.grad_clip if clips_itself(plan) else None
        if plan.zero_stage == 0 and plan.dp == 1:
            # Nothing to reduce: ZeRO-0 would still flatten every gradient into a buffer,
            # all-reduce it over a group of one, scale it by 1 and copy it back, each step
            # (issue 14: 2.3 ms of a 16 ms step at the smallest shape, and a copy of all
            # gradients at any size).
            self.engine.enable_backward_allreduce = False

    def train_step(self, batches, lr: float, before_update=None) -> StepResult:
        self.set_lr(self.optimizer.param_groups, lr)
        micro_batches = self.next_micro_batches(batches)
        units = self.global_units(micro_batches)
        sums = torch.zeros(len(self.objective.stat_names), dtype=torch.float64,
                           device=self.engine.device)
        for i, batch in enumerate(micro_batches):
            if self.moe:   # what Megatron's schedule does for the router's aux/z losses
                moe_router_steps.set_aux_loss_scale(self.plan.grad_accum, self._loss_scale(),
                                                    self.engine.device)
            set_phase("forward")
            output, loss_func = self.objective.forward_step(self.engine, batch)
            loss, stats = self.normalised(loss_func, units)(output)
            self.engine.backward(loss)   # scales by 1/accumulation itself
            sums += self.stat_vector(stats, sums.device)
            if i < len(micro_batches) - 1:
                self.engine.step()       # not the accumulation boundary: no update
                continue
            if self.moe:
                moe_router_steps.finish_global_batch(self.modules)   # as finalize_model_grads
            set_phase("optimizer")
            if self.grad_clip is None:
                # The global norm is known only inside the step; ZeRO 1-3 skip a non-finite
                # one themselves (their overflow check) and report it as inf.
                norm, finite = None, True
            else:   # ZeRO-0 fp32: known now, and a non-finite one is skipped here
                norm = clip_by_global_norm(list(self.engine.module.parameters()),
                                           self.grad_clip,
                                           parallel_state.get_tensor_model_parallel_group())
                finite = math.isfinite(norm)
            apply = before_update is None or before_update(sums, units, norm)
            with updates_dropped(self.optimizer, drop=not (apply and finite)):
                self.engine.step()       # steps the optimizer at the accumulation boundary
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return StepResult(sums, units, norm, self._loss_scale())

    def _loss_scale(self) -> float | None:
        if self.plan.precision != "fp16":
            return None
        # ZeRO optimizers name it loss_scale, DeepSpeed's FP16 optimizer cur_scale
        return getattr(self.optimizer, "loss_scale", getattr(self.optimizer, "cur_scale", None))

    def static_memory(self) -> dict:
        params = list(self.engine.module.parameters())
        if self.plan.zero_stage == 3:   # each rank keeps its partition of every parameter
            weights = tensor_bytes(p.ds_tensor for p in params)
            masters = getattr(self.optimizer, "fp32_partitioned_groups_flat", [])
        else:
            weights = tensor_bytes(params)
            masters = getattr(self.optimizer, "single_partition_of_fp32_groups", [])
        # ZeRO gradients live in transient buckets/partitions: not measured here.
        return {"weights": weights, "gradients": None,
                "optimizer": tensor_bytes(masters) + optimizer_state_bytes(self.optimizer)}

    # -- optimizer state in model space (checkpoints) -------------------------------------
    def prepare_optimizer_state(self) -> None:
        super().prepare_optimizer_state()
        # DeepSpeed links parameter fragments to the optimizer state once, after the first
        # parameter group's step, leaving later groups unlinked: link again.
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def loss_scaler_states(self) -> list[dict]:
        state = deepspeed_scaler_state(getattr(self.optimizer, "loss_scaler", None))
        return [state] if state else []

    def load_loss_scaler_states(self, states: list[dict]) -> None:
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if states and deepspeed_scaler_state(scaler) is not None:
            load_deepspeed_scaler_state(scaler, states[0])

    def optimizer_state_fragment(self, param):
        if self.plan.zero_stage == 0:   # a plain torch optimizer: every DP rank holds it all
            slot = self.optimizer.state[param]
            return (parallel_state.get_data_parallel_group(), None,
                    {"master": param.detach(), "exp_avg": slot["exp_avg"],
                     "exp_avg_sq": slot["exp_avg_sq"]})
        if hasattr(param, "ds_id"):     # ZeRO-3: rank r holds elements [r * P, r * P + P)
            z3 = param._z3_optimizer
            group = z3._get_param_partition_group(param)
            parts = {k: z3._get_fp32_opt_state_partition(param, True, key)[0]
                     for k, key in (("master", None), ("exp_avg", "exp_avg"),
                                    ("exp_avg_sq", "exp_avg_sq"))}
            start = dist.get_rank(group) * parts["master"].numel()
            count = max(0, min(parts["master"].numel(), param.ds_numel - start))
            return group, start, {k: v[:count] for k, v in parts.items()}
        mapping = param._hp_mapping     # ZeRO-1/2: None on ranks owning no part of it
        if mapping is None:
            return param._dp_group, 0, None
        return (param._dp_group, mapping.lp_fragment_address.start,
                {"master": mapping.get_hp_fragment(),
                 **{k: mapping.get_hp_fragment(k) for k in ("exp_avg", "exp_avg_sq")}})

    def load_full_optimizer_state(self, param, tensors: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        if self.plan.zero_stage == 0:
            slot = self.optimizer.state[param]
            for k in ("exp_avg", "exp_avg_sq"):
                slot[k].copy_(tensors[k].reshape(param.shape))
        else:
            safe_set_full_fp32_param(param, tensors["master"])
            for k in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, tensors[k], k)
