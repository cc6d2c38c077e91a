"""Rank the layouts a profile can run at a given scale by predicted tokens/s per GPU.

Every combination of TP (within a node), PP, virtual stages, CP, EP, micro-batch, recompute
and (for data-parallel-only layouts) ZeRO stage goes through the plan itself (make_plan: the
same divisibility rules and memory estimate `trainops plan` prints); layouts it refuses or
whose memory exceeds the GPU are skipped, the rest are predicted and sorted.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from apt.core.config import ConfigError
from apt.trainops.distributed.memory import GIB
from apt.trainops.distributed.plan import make_plan
from .hardware import Hardware
from .predict import Prediction, predict
from .shape import layout_from_plan, shape_from_config


@dataclass(frozen=True)
class Candidate:
    plan: object
    prediction: Prediction

    def line(self) -> str:
        p, pr = self.plan, self.prediction
        return (f"{layout_from_plan(p).describe():58s} {pr.tokens_per_s_per_gpu:9,.0f} tok/s/GPU"
                f"  MFU {pr.mfu:5.1%}  step {pr.step_s:7.2f} s  memory "
                f"{p.memory.total / GIB:5.1f} GiB")


def _variants(cfg, world: int, gpn: int):
    m, d = cfg.model, cfg.training.distributed
    tps = [t for t in (1, 2, 4, 8) if t <= gpn and m.num_attention_heads % t == 0
           and m.kv_heads % t == 0]
    pps = [p for p in (1, 2, 4, 8, 16) if m.num_layers % p == 0]
    eps = [e for e in (1, 2, 4, 8, 16, 32, 64) if not m.num_experts and e == 1
           or m.num_experts and m.num_experts % e == 0]
    for tp, pp, cp, ep in itertools.product(tps, pps, (1, 2), eps):
        if world % (tp * pp * cp):
            continue
        vps = [v for v in (1, 2, 4, 5) if v == 1 or pp > 1 and m.num_layers % (pp * v) == 0]
        zeros = (1, 3) if tp == pp == cp == ep == 1 else (1,)
        for vp, mb, rc, zero in itertools.product(vps, (1, 2, 4), ("none", "selective", "full"),
                                                  zeros):
            strategy = "fsdp" if zero == 3 else "hybrid"
            dist = replace(d, strategy=strategy, tensor_parallel=tp, pipeline_parallel=pp,
                           virtual_pipeline_stages=vp, context_parallel=cp, expert_parallel=ep,
                           sequence_parallel=tp > 1, zero_stage=zero, recompute=rc,
                           data_parallel=None, world_size=None, engine="auto")
            yield replace(cfg, training=replace(cfg.training, micro_batch_size=mb,
                                                distributed=dist))


def search(cfg, world: int, gpn: int, hw: Hardware, top: int = 5) -> tuple[list, int, int]:
    """(the ``top`` candidates, layouts tried, layouts that fit)."""
    shape = shape_from_config(cfg.model, cfg.data.seq_length)
    budget = hw.memory_gib * GIB
    found, tried, seen = [], 0, set()
    for variant in _variants(cfg, world, gpn):
        tried += 1
        try:
            plan = make_plan(variant, world, gpn, device_type="cuda")
        except ConfigError:
            continue
        key = layout_from_plan(plan)
        if key in seen or plan.memory.total > budget:
            continue
        seen.add(key)
        found.append(Candidate(plan, predict(shape, key, hw)))
    found.sort(key=lambda c: -c.prediction.tokens_per_s_per_gpu)
    return found[:top], tried, len(found)
