"""Train several parallel layouts in one launch, each from the same initial weights.

    torchrun --nproc_per_node N tests/workers/train_layouts.py --spec spec.json --out out.json

spec.json: {"common": [overrides...], "layouts": {name: {"set": [...], "sabotage_sp": bool,
                                                           "lora_merge_check": bool,
                                                           "greedy_probe": int}}}
Rank 0 writes {name: {"losses": [...], "grad_norms": [...], "metrics": [{name: value}, ...],
"eval": {val_...}, "engine": ..., "layout": ...}}; the trainer class is the profile's
(``trainer_for``). ``greedy_probe`` (O1Trainer): also the greedy answers to that many held-out
prompts after training (``greedy``).
``sabotage_sp`` unmarks sequence-parallel params, so their gradients are not all-reduced over
TP: the matrix must catch that wiring bug. ``lora_merge_check`` trains nothing: it gives the
LoRA adapters non-zero B, and reports the largest logit change merge_lora makes on this layout.
"""
import argparse
import json


def _max_over_ranks(sizes: dict) -> dict:
    """The busiest rank's bytes per kind (the plan estimates the busiest pipeline stage)."""
    import torch
    import torch.distributed as dist
    keys = sorted(k for k, v in sizes.items() if v is not None)
    values = torch.tensor([float(sizes[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(keys, values.tolist()))


def _lora_merge_change(trainer) -> dict:
    """Max |logits with adapters - logits after merge_lora| over every rank (PP = 1), and the
    number of adapters merged on rank 0."""
    import torch
    import torch.distributed as dist
    from apt.model.lora import adapters, merge_lora
    generator = torch.Generator().manual_seed(0)   # the same draws on every rank
    for *_, adapter in adapters(trainer.modules):
        adapter.B.data.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.1)
    model = trainer.modules[0].eval()
    seq = trainer.config.data.seq_length
    tokens = (torch.arange(2 * seq).reshape(2, seq) * 7) % 250
    positions = torch.arange(seq).expand(2, -1)
    with torch.no_grad():
        before = model(tokens, positions, None)
        merged = merge_lora(trainer.modules)
        change = (model(tokens, positions, None) - before).abs().max().reshape(1)
    dist.all_reduce(change, op=dist.ReduceOp.MAX)
    return {"merge_change": change.item(), "merged": merged}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from apt.core.logging import configure_logging
    configure_logging()
    from apt.core.config import load_profile
    from apt.trainops.distributed import shutdown_distributed
    from apt.trainops.trainers import trainer_for
    from apt.trainops.objectives.base import unwrap

    spec = json.load(open(args.spec))
    results = {}
    for name, layout in spec["layouts"].items():
        config = load_profile("tiny", spec["common"] + layout["set"])
        trainer = trainer_for(config).from_config(config)   # e.g. ClaudeTrainer for dpo
        if layout.get("lora_merge_check"):
            results[name] = _lora_merge_change(trainer)
            continue
        if layout.get("sabotage_sp"):
            for module in trainer.modules:
                for param in module.parameters():
                    param.sequence_parallel = False
        summary = trainer.train()
        plan = trainer.plan
        measured = _max_over_ranks(trainer.engine.static_memory())
        results[name] = {"memory_measured": measured,
                         "memory_estimated": {"weights": plan.memory.weights,
                                              "gradients": plan.memory.gradients,
                                              "optimizer": plan.memory.optimizer},
                         "losses": [r["loss"] for r in trainer.history],
                         "grad_norms": [r["grad_norm"] for r in trainer.history],
                         # an objective's own step metrics (e.g. rewards/accuracies)
                         "metrics": [{k: v for k, v in r.items() if "/" in k}
                                     for r in trainer.history],
                         "eval": {k: v for k, v in summary.items()
                                  if k.startswith(("val_", "initial_val_"))},
                         "engine": plan.engine, "zero_stage": plan.zero_stage,
                         "kernels": list(unwrap(trainer.modules[0]).kernels),
                         "layout": [plan.tp, plan.pp, plan.vp, plan.dp, plan.ep,
                                    plan.sequence_parallel]}
        if layout.get("greedy_probe"):   # O1Trainer: greedy answers to held-out prompts
            dataset = trainer.eval_dataloader.dataset
            results[name]["greedy"] = trainer.greedy_answers(
                dataset.get_batch(range(layout["greedy_probe"])).prompts)
    if trainer.runtime.is_main:
        json.dump(results, open(args.out, "w"))
    shutdown_distributed()


if __name__ == "__main__":  # dist_checkpointing's async writer uses spawn: guard the entry
    main()
