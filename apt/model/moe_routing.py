"""The MoE router: the profile's routing options as Megatron settings, and what the router did.

``router_settings`` maps ``model.moe_*`` to ``TransformerConfig`` fields. Megatron applies the
losses and the expert bias inside its ``TopKRouter``; two things happen outside the model and
are the engine's job (apt/trainops/distributed/engines): the aux/z-loss gradient scale
(``MoEAuxLossAutoScaler``) and the expert-bias update after each global batch.

``RoutingCounters`` records, per layer, what the router chose while training: tokens per
expert before and after capacity dropping, and the summed entropy of the routing scores. The
counts stay on the device and are only read when metrics are logged (no per-step sync).
"""
from __future__ import annotations

import torch

from apt.core.config import ModelConfig


def router_settings(m: ModelConfig) -> dict:
    """``TransformerConfig`` keyword arguments of the router (empty for a dense model)."""
    if not m.num_experts:
        return {}
    losses = m.moe_load_balancing in ("aux_loss", "seq_aux_loss", "global_aux_loss")
    return dict(
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_top_k,
        moe_router_load_balancing_type=m.moe_load_balancing,
        # Megatron asserts a zero coefficient for sinkhorn; "none" ignores it anyway.
        moe_aux_loss_coeff=m.moe_aux_loss_coeff if losses else 0.0,
        moe_z_loss_coeff=m.moe_z_loss_coeff or None,
        moe_router_score_function=m.moe_score_function,
        moe_router_enable_expert_bias=m.moe_expert_bias,
        moe_router_bias_update_rate=m.moe_bias_update_rate,
        moe_expert_capacity_factor=m.moe_capacity_factor,
        moe_token_drop_policy=m.moe_drop_policy,
        # Qwen3-MoE without norm_topk_prob: softmax over all experts, the top-k weights kept
        # as they are. With it (and Mixtral), softmax over the top-k logits: the same weights
        # as softmax-then-renormalise.
        moe_router_pre_softmax=not m.moe_norm_topk_prob,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_size,
    )


def routers(modules) -> list:
    """Every ``TopKRouter`` of the model chunks, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter
    return [m for module in modules for m in module.modules() if isinstance(m, TopKRouter)]


def _scores(router, logits: torch.Tensor) -> torch.Tensor:
    """The per-token distribution over experts the router scores with (rows sum to 1)."""
    logits = logits.detach().float()
    if router.score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return torch.softmax(logits, dim=-1)


def _choice(router, logits: torch.Tensor) -> torch.Tensor:
    """[experts] tokens that chose each expert before capacity dropping (top-k of the
    selection scores: the logits for softmax, sigmoid + expert bias for sigmoid)."""
    select = logits.detach().float()
    if router.score_function == "sigmoid":
        select = torch.sigmoid(select)
        if router.expert_bias is not None:
            select = select + router.expert_bias
    top = torch.topk(select, k=router.topk, dim=-1).indices
    return torch.zeros_like(select).scatter_(1, top, 1.0).sum(dim=0)


class RoutingCounters:
    """Per layer: [chosen per expert (E), kept per expert (E), entropy sum, tokens], summed over
    the training forwards since the last ``take()``. Only forwards with gradients count (as
    Megatron's expert-bias counts): evaluation and the no-grad pass of activation recompute
    do not."""

    def __init__(self, modules, num_layers: int, num_experts: int):
        self.routers = routers(modules)
        self.num_experts = num_experts
        device = next(iter(modules[0].parameters())).device
        self.sums = torch.zeros(num_layers, 2 * num_experts + 2, dtype=torch.float64,
                                device=device)
        for router in self.routers:
            router.routing = self._recording(router, router.routing)

    def _recording(self, router, routing):
        row = router.layer_number - 1          # Megatron numbers layers from 1, globally
        experts = self.num_experts

        def recorded(logits, *args, **kwargs):
            probs, routing_map = routing(logits, *args, **kwargs)
            if router.training and torch.is_grad_enabled():
                with torch.no_grad():
                    flat = logits.reshape(-1, experts)
                    scores = _scores(router, flat)
                    entropy = -(scores * torch.log(scores.clamp(min=1e-20))).sum()
                    kept = routing_map.reshape(-1, experts).sum(dim=0).double()
                    chosen = (_choice(router, flat).double()
                              if router.config.moe_expert_capacity_factor is not None else kept)
                    sums = self.sums[row]
                    sums[:experts] += chosen
                    sums[experts:2 * experts] += kept
                    sums[-2] += entropy.double()
                    sums[-1] += flat.shape[0]
            return probs, routing_map
        return recorded

    def take(self) -> torch.Tensor:
        sums = self.sums.clone()
        self.sums.zero_()
        return sums
