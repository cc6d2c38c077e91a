"""The run control's decision on two ranks, one launch: each scenario gives every rank the
same Decision whichever rank voted.

    torchrun --nproc_per_node 2 tests/workers/run_control_worker.py --dir DIR --out out.json

Scenarios: a SIGTERM to rank 1 only; rank 0's loss NaN under each anomaly policy (rewind with
no checkpoint committed yet); a clean step. Rank 0 writes {scenario: [report per rank]}.
"""
import argparse
import json
import os
import signal
from pathlib import Path

SCENARIOS = {"clean": ("skip", None, None), "preempt": ("skip", 1, None),
             "skip": ("skip", None, 0), "rewind": ("rewind", None, 0),
             "stop": ("stop", None, 0)}


def _step(name, policy, preempt_rank, nan_rank, directory: Path) -> dict:
    import torch
    import torch.distributed as dist
    from apt.core.config import load_profile, with_overrides
    from apt.trainops.artifacts import ArtifactManager
    from apt.trainops.checkpoints import CheckpointManager
    from apt.trainops.distributed.engines.base import StepResult
    from apt.trainops.distributed.plan import make_plan
    from apt.trainops.trainers.progress import Progress
    from apt.trainops.trainers.train_state import TrainState
    from apt.trainops.objectives import build_objective
    from apt.trainops.reliability.anomaly import AnomalyGuard
    from apt.trainops.reliability.run_control import RunControl
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = with_overrides(load_profile("tiny"), {"training.anomaly.policy": policy})
    plan = make_plan(cfg, world, world, device_type="cpu")
    control = RunControl(cfg, plan, build_objective("lm"),
                         CheckpointManager(directory / name / "checkpoints"),
                         AnomalyGuard(cfg.training.anomaly), world_size=world, rank=rank,
                         is_main=rank == 0, save=None, restore=None)
    flushed = []
    artifacts = ArtifactManager(directory / name, "run", enabled=rank == 0)
    with control.running(artifacts, Progress(10, 0, enabled=False)):
        if rank == preempt_rank:
            os.kill(os.getpid(), signal.SIGTERM)   # what a scheduler sends; caught, not fatal
        control.begin_step(1, 1)
        sums = torch.tensor([float("nan") if rank == nan_rank else 2.0], dtype=torch.float64)
        units = torch.tensor(4.0)
        applied = control.vote(sums, units, 1.0)
        anomaly = control.settle(StepResult(sums, units, 1.0))
        decision = control.decide(TrainState(step=1, consumed_samples=plan.global_batch),
                                  flush=lambda: flushed.append(1))
    return {"decision": decision.value, "applied": applied, "anomaly": anomaly,
            "flushed": len(flushed), "reason": control.reason, "loss": control.votes.loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch.distributed as dist
    dist.init_process_group("gloo")
    results = {}
    for name, (policy, preempt_rank, nan_rank) in SCENARIOS.items():
        mine = _step(name, policy, preempt_rank, nan_rank, Path(args.dir))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results[name] = gathered
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
