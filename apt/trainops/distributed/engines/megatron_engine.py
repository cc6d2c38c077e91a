"""Megatron-core's own engine: DDP + (distributed) optimizer + pipeline schedules.

Used for pipelines (DeepSpeed refuses ZeRO 2/3 with them and cannot drive Megatron's
schedules), sequence parallel (norm gradients must be all-reduced over TP:
``finalize_model_grads`` does it for params marked ``sequence_parallel``), and Megatron expert
parallel (expert gradients reduce over the expert-data-parallel group, not the whole DP group).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from apt.core.config import APTConfig
from apt.trainops.checkpoints.loss_scale import load_megatron_scaler_state, megatron_scaler_state
from ..memory import REDUCE_BUCKET_ELEMENTS
from ..plan import Plan
from apt.trainops.reliability.watchdog import set_phase
from .base import StepResult, TrainEngine, optimizer_state_bytes, tensor_bytes

ADAM = ("exp_avg", "exp_avg_sq")


class MegatronEngine(TrainEngine):
    kind = "megatron"
    def __init__(self, modules: list[torch.nn.Module], cfg: APTConfig, plan: Plan, objective):
        t = cfg.training
        self.plan, self.objective = plan, objective
        self.weight_decay = t.weight_decay
        config = modules[0].config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=plan.distributed_optimizer,
            bucket_size=REDUCE_BUCKET_ELEMENTS)
        self.chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                               # every chunk after the first starts un-bucketed,
                                               # as Megatron-LM does with virtual stages
                                               disable_bucketing=i > 0)
                       for i, m in enumerate(modules)]
        self.modules = modules
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=t.learning_rate, min_lr=t.min_learning_rate,
            weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps, clip_grad=t.grad_clip, bf16=plan.precision == "bf16",
            fp16=plan.precision == "fp16", params_dtype=config.params_dtype,
            use_distributed_optimizer=plan.distributed_optimizer), self.chunks)
        # The schedule calls these: loss scaling, the end-of-backward gradient reductions
        # (DP, TP for sequence-parallel norms, embeddings shared across pipeline stages).
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ([c.no_sync for c in self.chunks] if len(self.chunks) > 1
                               else self.chunks[0].no_sync)
        self.forward_backward = get_forward_backward_func()

    def set_lr(self, param_groups, lr: float) -> None:
        # Megatron's groups carry multipliers that its own scheduler applies (wd_mult = 0 for
        # norms and biases): without that scheduler we apply them, or norms get decayed.
        for group in param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)

    def train_step(self, batches, lr: float, before_update=None) -> StepResult:
        self.set_lr(self.optimizer.param_groups, lr)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro_batches = self.next_micro_batches(batches)
        units = self.global_units(micro_batches)

        def forward_step(data_iterator, model):
            set_phase("forward")
            output, loss_func = self.objective.forward_step(model, next(data_iterator))
            return output, self.normalised(loss_func, units)

        # Every virtual stage walks the same micro-batches: one iterator per chunk.
        iterators = [iter(micro_batches) for _ in self.chunks]
        rows, seq_length = micro_batches[0].model_shape   # a preference pair is two rows
        stats = self.forward_backward(
            forward_step_func=forward_step, data_iterator=iterators if len(iterators) > 1
            else iterators[0], model=self.chunks, num_microbatches=self.plan.grad_accum,
            seq_length=seq_length, micro_batch_size=rows, forward_only=False)
        set_phase("optimizer")
        sums = self._pipeline_sums(stats, units.device)
        grad_norm = self._update(lambda norm: before_update is None or
                                 before_update(sums, units, norm))
        return StepResult(sums, units, grad_norm, self.optimizer.get_loss_scale().item()
                          if self.plan.precision == "fp16" else None)

    def _update(self, allowed) -> float | None:
        """Megatron's ChainedOptimizer.step() with ``allowed(grad_norm)`` asked between the
        global gradient norm and the update (the anomaly guard). Returns the norm (None after
        an fp16 overflow, which Megatron skips and rescales itself)."""
        if self.optimizer.prepare_grads():   # fp16 overflow: found on every rank alike
            allowed(None)                    # every rank still joins the per-step all-reduce
            return None
        grad_norm = self.optimizer.get_grad_norm()
        if not allowed(grad_norm):
            return grad_norm
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
            if params and opt.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(
                    params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.optimizer.step_with_ready_grads()
        return grad_norm

    def _pipeline_sums(self, stats: list[dict], device) -> torch.Tensor:
        """Only the last pipeline stage computes the loss: share its sums with every stage."""
        sums = torch.zeros(len(self.objective.stat_names), dtype=torch.float64, device=device)
        for entry in stats:   # empty on other stages
            sums += self.stat_vector(entry, device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        return sums


    def static_memory(self) -> dict:
        buffers = [b for c in self.chunks for b in c.buffers + c.expert_parallel_buffers]
        masters = [t for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                   for group in getattr(opt, "shard_fp32_from_float16_groups", [])
                   for t in group]
        return {"weights": tensor_bytes(p for m in self.modules for p in m.parameters()),
                "gradients": tensor_bytes(b.grad_data for b in buffers),
                "optimizer": tensor_bytes(masters) + optimizer_state_bytes(self.optimizer)}


    # -- optimizer state in model space (checkpoints) -------------------------------------
    def _owner(self, param):
        """(Megatron optimizer holding ``param``'s state, its master, its state slot, range)."""
        if not hasattr(self, "_owners"):
            self._owners = {}
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                if hasattr(opt, "buffers"):        # distributed optimizer: a DP shard each
                    for buffer in opt.buffers:
                        for p in buffer.param_index_map:
                            self._owners[p] = opt
                else:                             # FP32Optimizer: params are the masters
                    for group in opt.optimizer.param_groups:
                        for p in group["params"]:
                            self._owners[p] = opt
        return self._owners[param]

    def _dynamic_scalers(self) -> list:
        chain = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [opt.grad_scaler for opt in chain
                if megatron_scaler_state(getattr(opt, "grad_scaler", None)) is not None]

    def loss_scaler_states(self) -> list[dict]:
        return [megatron_scaler_state(scaler) for scaler in self._dynamic_scalers()]

    def load_loss_scaler_states(self, states: list[dict]) -> None:
        # A chain may hold more scalers than the checkpoint (e.g. saved by DeepSpeed's one).
        for i, scaler in enumerate(self._dynamic_scalers()):
            if states:
                load_megatron_scaler_state(scaler, states[min(i, len(states) - 1)])

    def optimizer_state_fragment(self, param):
        opt = self._owner(param)
        if not hasattr(opt, "buffers"):   # FP32Optimizer: every DP rank holds it all
            group = (parallel_state.get_data_parallel_group(with_context_parallel=True)
                     if getattr(param, "allreduce", True)
                     else parallel_state.get_expert_data_parallel_group())
            slot = opt.optimizer.state[param]
            return group, None, {"master": param.detach(), **{k: slot[k] for k in ADAM}}
        if param not in opt.model_param_group_index_map:   # this rank owns no slice of it
            return opt.data_parallel_group, 0, None
        owned = opt._get_model_param_range_map(param)["param"]
        local = opt._get_main_param_and_optimizer_states(param)
        return opt.data_parallel_group, owned.start, {"master": local["param"],
                                                      **{k: local[k] for k in ADAM}}

    def load_full_optimizer_state(self, param, tensors: dict) -> None:
        opt = self._owner(param)
        if not hasattr(opt, "buffers"):
            for k in ADAM:
                opt.optimizer.state[param][k].copy_(tensors[k].reshape(param.shape))
        elif param in opt.model_param_group_index_map:
            owned = opt._get_model_param_range_map(param)["param"]
            local = opt._get_main_param_and_optimizer_states(param)
            local["param"].copy_(tensors["master"].flatten()[owned.start:owned.end])
            for k in ADAM:
                local[k].copy_(tensors[k].flatten()[owned.start:owned.end])
