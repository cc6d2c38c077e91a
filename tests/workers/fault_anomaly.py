"""NaN injected on one rank, under each anomaly policy and engine, in one launch.

    torchrun --nproc_per_node 2 tests/workers/fault_anomaly.py --spec spec.json --out out.json

spec.json: {"common": [overrides...], "runs": {name: {"set": [...], "fault": str or null}}}.
Every rank reports, per run: its losses, sample digests and anomaly records, Adam's step
count, whether its weights are finite, whether it stopped (AnomalyStop) and with what message;
rank 0 writes {name: [rank 0's report, rank 1's report, ...]}. A run with "poison_save" then
sets one weight of the last rank to NaN and tries to save a checkpoint: it must be refused on
every rank.
"""
import argparse
import json
import os


def _report(trainer, stopped):
    import torch
    finite = all(bool(torch.isfinite(p).all()) for m in trainer.modules for p in m.parameters())
    return {"losses": [r["loss"] for r in trainer.history],
            "steps": [r["step"] for r in trainer.history],
            "digests": [r["sample_digest"] for r in trainer.history],
            "anomalies": trainer.anomalies.count, "adam_steps": trainer.engine.optimizer_step_count(),
            "finite": finite, "stopped": stopped, "step": trainer.step,
            "engine": trainer.plan.engine}


def _poisoned_save(trainer) -> str:
    """Make one weight of the last rank NaN and save: every rank must refuse."""
    import torch
    import torch.distributed as dist
    from apt.trainops.reliability.anomaly import AnomalyStop
    if dist.get_rank() == dist.get_world_size() - 1:
        with torch.no_grad():
            next(trainer.modules[0].parameters()).view(-1)[0] = float("nan")
    trainer.step += 1   # a step no checkpoint exists for
    try:
        trainer.save_checkpoint()
    except AnomalyStop as exc:
        return str(exc)
    return "saved"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from apt.core.logging import configure_logging
    configure_logging()
    import torch.distributed as dist
    from apt.core.config import load_profile
    from apt.trainops.distributed import shutdown_distributed
    from apt.trainops.trainers import trainer_for
    from apt.trainops.reliability.anomaly import AnomalyStop

    spec = json.load(open(args.spec))
    results = {}
    for name, run in spec["runs"].items():
        os.environ.pop("APT_FAULT_INJECT", None)
        if run.get("fault"):
            os.environ["APT_FAULT_INJECT"] = run["fault"]
        config = load_profile("tiny", spec["common"] + run["set"])
        trainer = trainer_for(config).from_config(config)
        stopped = None
        try:
            trainer.train()
        except AnomalyStop as exc:
            stopped = str(exc)
        os.environ.pop("APT_FAULT_INJECT", None)
        report = _report(trainer, stopped)
        if run.get("poison_save"):
            report["poisoned_save"] = _poisoned_save(trainer)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, report)
        results[name] = gathered
    if dist.get_rank() == 0:
        json.dump(results, open(args.out, "w"))
    shutdown_distributed()


if __name__ == "__main__":  # dist_checkpointing's async writer uses spawn: guard the entry
    main()
