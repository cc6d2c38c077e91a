"""Expert metrics of an MoE run, per layer, at each log interval.

Added to the interval's last step record (so metrics.jsonl and every backend get them), over
the steps since the previous log:
- ``moe/layer{i}/tokens_min|max|std``: tokens routed to each expert per step (before capacity
  dropping), ``max_violation`` = max load / mean load - 1, ``dead_experts`` (no token at all),
  ``router_entropy`` (mean entropy of a token's routing scores, nats; log(E) = uniform),
  ``dropped_fraction`` (routed assignments over capacity), ``aux_loss`` and ``z_loss`` (as
  Megatron's tracker holds them: without their coefficients, mean per micro-batch),
  ``expert_bias_norm``, and ``load`` (each expert's share x E, a list, for plots/expert_load.png);
- ``moe/<name>`` over layers: the worst ``max_violation``, the sum of ``dead_experts``, the
  mean of the rest.

Counting costs no collective per step: the counters stay on each rank's device and one
all-reduce over all ranks per log interval gathers them (pipeline stages hold disjoint layers;
TP ranks without sequence parallel route the same tokens, so their counts are divided out).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from apt.model.moe_routing import RoutingCounters, routers
from apt.trainops.callbacks import Callback

AUX_LOSS_NAMES = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss")


def _tracked(name: str, num_layers: int, device) -> torch.Tensor:
    """Megatron's per-layer tracker values of ``name`` (zeros when never recorded)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    entry = get_moe_layer_wise_logging_tracker().get(name)
    if entry is None:
        return torch.zeros(num_layers, dtype=torch.float64, device=device)
    return entry["values"][:num_layers].detach().to(device=device, dtype=torch.float64)


class ExpertMetrics(Callback):
    def on_train_start(self, trainer) -> None:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
        m = trainer.config.model
        self.layers, self.experts = m.num_layers, m.num_experts
        self.counters = RoutingCounters(trainer.modules, self.layers, self.experts)
        self.routers = routers(trainer.modules)
        # Megatron's tracker is process-global and sized by the first model that recorded into
        # it (clearing only zeroes it): a run after another in the same process, with more
        # layers, would index past it. Start this run's with nothing.
        get_moe_layer_wise_logging_tracker().clear()

    def on_log(self, trainer, records: list[dict]) -> None:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
        counts = self.counters.take()
        device, layers = counts.device, self.layers
        # The global aux loss's shares add up over DP ranks too (the others' average over DP).
        aux = sum(_tracked(n, layers, device) * (trainer.plan.dp if n.startswith("global")
                                                  else 1) for n in AUX_LOSS_NAMES)
        z = _tracked("z_loss", layers, device)
        clear_aux_losses_tracker()
        bias = torch.zeros(layers, self.experts + 1, dtype=torch.float64, device=device)
        for router in self.routers:   # the last column counts the ranks holding the layer
            if router.expert_bias is not None:
                bias[router.layer_number - 1, :-1] = router.expert_bias.double()
            bias[router.layer_number - 1, -1] = 1.0
        packed = torch.cat([counts, aux[:, None], z[:, None], bias], dim=1)
        dist.all_reduce(packed)   # the one collective: every rank, once per log interval
        records[-1].update(self._metrics(packed, trainer.plan, len(records)))

    def _metrics(self, packed: torch.Tensor, plan, steps: int) -> dict:
        e = self.experts
        # TP ranks without sequence parallel route the same tokens (and compute the same z).
        duplicates = 1 if plan.sequence_parallel else plan.tp
        micro_batches = plan.dp * plan.grad_accum * steps
        out, per_layer = {}, []
        for i, row in enumerate(packed.tolist()):
            chosen = [c / duplicates for c in row[:e]]
            kept = sum(row[e:2 * e]) / duplicates
            entropy, tokens = row[2 * e] / duplicates, row[2 * e + 1] / duplicates
            aux, z = row[2 * e + 2], row[2 * e + 3]
            holders = row[-1] or 1.0
            bias = [b / holders for b in row[2 * e + 4:-1]]
            total = sum(chosen)
            mean = total / e
            std = math.sqrt(sum((c - mean) ** 2 for c in chosen) / e)
            layer = {
                "tokens_min": min(chosen) / steps, "tokens_max": max(chosen) / steps,
                "tokens_std": std / steps,
                "max_violation": max(chosen) / mean - 1 if mean else 0.0,
                "dead_experts": sum(1 for c in chosen if c == 0),
                "router_entropy": entropy / tokens if tokens else 0.0,
                "dropped_fraction": 1 - kept / total if total else 0.0,
                "aux_loss": aux / micro_batches,
                "z_loss": z / (micro_batches * plan.tp * plan.cp),
                "expert_bias_norm": math.sqrt(sum(b * b for b in bias)),
            }
            per_layer.append(layer)
            out.update({f"moe/layer{i}/{k}": v for k, v in layer.items()})
            out[f"moe/layer{i}/load"] = [c / mean if mean else 0.0 for c in chosen]
        out["moe/max_violation"] = max(l["max_violation"] for l in per_layer)
        out["moe/dead_experts"] = sum(l["dead_experts"] for l in per_layer)
        for key in ("router_entropy", "dropped_fraction", "aux_loss", "z_loss",
                    "expert_bias_norm"):
            out[f"moe/{key}"] = sum(l[key] for l in per_layer) / len(per_layer)
        return out
