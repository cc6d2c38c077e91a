"""What Megatron's schedules do for an MoE router around the model, for engines that do not
run those schedules (DeepSpeed): shared/FEASIBILITY.md, "Post-training ... traps".

- The aux and z losses are not added to the loss: ``MoEAuxLossAutoScaler`` injects their
  gradient in backward, scaled by a class-wide factor that Megatron's ``forward_step`` sets to
  ``loss_scale / num_microbatches`` (schedules.py). Unset, it stays 1: the losses' gradients
  would be ``num_microbatches`` times too large under gradient accumulation.
- The aux-loss-free expert bias moves once per global batch, from the tokens each expert
  received on every TP x CP x DP rank, in ``finalize_model_grads``; the counters and the
  global aux loss's running counts are reset there too.
Both call Megatron's own functions, so the two engines step the router identically.
"""
from __future__ import annotations

import torch
from megatron.core.distributed.finalize_model_grads import (_update_router_expert_bias,
                                                            reset_model_temporary_tensors)
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


def is_moe(modules) -> bool:
    return bool(getattr(modules[0].config, "num_moe_experts", None))


def set_aux_loss_scale(num_microbatches: int, loss_scale: float | None, device) -> None:
    """The aux/z-loss gradient factor of one micro-batch: the main loss's (fp16 loss scale
    divided by the accumulation), as Megatron's forward_step sets it."""
    scale = (loss_scale or 1.0) / num_microbatches
    # shape [1], as Megatron passes it: the first call keeps the tensor, later ones copy into it
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([scale], dtype=torch.float32, device=device))


def finish_global_batch(modules) -> None:
    """After the step's last backward (collective over TP x CP x DP when the bias is on)."""
    config = modules[0].config
    if config.moe_router_enable_expert_bias:
        _update_router_expert_bias(modules, config)
    reset_model_temporary_tensors(config, modules)
