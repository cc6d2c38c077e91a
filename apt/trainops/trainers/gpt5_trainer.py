"""GPT5Trainer: sparse (mixture-of-experts) pretraining on the one training loop.

The seed's name for large MoE pretraining. What it adds to PreTrainer is the router's side:
- the load-balancing settings as keyword arguments (``top_k``, ``load_balancing``,
  ``aux_loss_coeff``, ``z_loss_coeff``, ``expert_bias``, ``capacity_factor``, ...), checked
  like a profile's ``model.moe_*`` keys; the defaults are the schema's (aux loss 1e-2);
- a refusal of a dense model: there is nothing to route.
Both engines apply the router's aux/z-loss gradient scale and expert-bias update as Megatron's
schedules do (distributed/engines/moe_router_steps.py); the expert metrics (per-layer load,
dead experts, entropy, dropped tokens, losses) are logged at every log interval
(monitoring/expert_metrics.py) for any MoE run.
"""
from __future__ import annotations

from apt.core.config import APTConfig, ConfigError, with_overrides
from apt.trainops.objectives import LanguageModelObjective
from .pretrainer import PreTrainer

# keyword argument -> model.<key>
ROUTER_ARGUMENTS = {"num_experts": "num_experts", "top_k": "moe_top_k",
                    "load_balancing": "moe_load_balancing",
                    "aux_loss_coeff": "moe_aux_loss_coeff", "z_loss_coeff": "moe_z_loss_coeff",
                    "score_function": "moe_score_function", "expert_bias": "moe_expert_bias",
                    "bias_update_rate": "moe_bias_update_rate",
                    "capacity_factor": "moe_capacity_factor", "drop_policy": "moe_drop_policy"}


class GPT5Trainer(PreTrainer):
    """``GPT5Trainer(config=load_profile("moe-tiny"), load_balancing="seq_aux_loss").train()``:
    next-token pretraining of an MoE model; keyword arguments override ``model.moe_*``."""

    def __init__(self, model=None, *, config: APTConfig | None = None, **kwargs):
        router = {key: kwargs.pop(arg) for arg, key in ROUTER_ARGUMENTS.items()
                  if kwargs.get(arg) is not None}
        cfg = config or APTConfig(model=getattr(model, "arch", APTConfig().model))
        if router:
            if model is not None:
                raise ConfigError("router settings are the model's: build the model with "
                                  "them (APTModel(num_experts=..., moe_...=...))", key="model")
            cfg = with_overrides(cfg, {f"model.{k}": v for k, v in router.items()})
        if not cfg.model.num_experts:
            raise ConfigError("GPT5Trainer trains a mixture-of-experts model: set "
                              "model.num_experts (e.g. the moe-tiny profile)",
                              key="model.num_experts")
        kwargs.setdefault("objective", LanguageModelObjective())
        super().__init__(model=model, config=cfg, **kwargs)
