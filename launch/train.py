#!/usr/bin/env python
"""APT's training entry point, the same under every launcher:

    python launch/train.py --profile tiny                                   # one process
    torchrun --nproc_per_node=2 launch/train.py --profile tiny              # CPU: gloo
    deepspeed --num_gpus 2 launch/train.py --profile tiny                   # CPU or GPU
    deepspeed --hostfile hosts launch/train.py --profile 70b                # a cluster
    srun python launch/train.py --profile 70b                               # SLURM
    python launch/train.py --profile tiny --benchmark 50 --warmup 10        # timing only

The profile is resolved and the parallel plan checked before any process group starts: a
wrong profile, too little memory for the plan or an unwritable or full checkpoint disk exits
with code 2 and a one-line reason; SIGTERM before the first step exits with 75, quietly; a
rendezvous that does not complete in training.distributed.rendezvous_timeout_s exits with 1,
naming its address. Launched workers die with their launcher.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

if __name__ == "__main__":
    # Before torch is imported (seconds): a SIGTERM from here to the first step exits 75 with
    # one line, and a worker dies with its launcher (apt/trainops/reliability/lifetime.py).
    from apt.trainops.reliability.lifetime import die_with_launcher, exit_on_sigterm_until_loop
    exit_on_sigterm_until_loop()
    die_with_launcher()

from apt.core.logging import configure_logging, quiet_library_warnings  # noqa: E402

quiet_library_warnings()   # before the libraries' import-time warnings (apt/core/logging.py)

from apt.cli import add_profile_arguments  # noqa: E402
from apt.core.exit_codes import EXIT_ANOMALY, EXIT_CONFIG_ERROR, EXIT_PREEMPTED  # noqa: E402
from apt.core.config import ConfigError, load_profile  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_profile_arguments(parser)
    # The deepspeed launcher appends --local_rank=N; torchrun and srun do not.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                        help="time STEPS training steps after --warmup steps, print one line")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps (--benchmark)")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="resume from this checkpoint directory (any layout); "
                             "--set training.checkpoints.auto_resume=true takes the newest")
    args = parser.parse_args(argv)   # torch not imported yet: an argument error is instant
    from apt.trainops.checkpoints.manager import CheckpointError
    from apt.trainops.runtime.process_groups import RendezvousError
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    configure_logging()
    try:
        config = load_profile(args.profile, args.overrides)
        from apt.trainops.trainers import trainer_for
        from apt.trainops.trainers.benchmark import (benchmark_config, benchmark_summary,
                                                 format_benchmark)
        if args.benchmark:
            config = benchmark_config(config, args.benchmark, args.warmup)
        trainer = trainer_for(config).from_config(config, resume_from_checkpoint=args.resume)
    except (ConfigError, CheckpointError) as exc:
        print(f"apt: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except RendezvousError as exc:   # not the input's fault: a launcher's restart may help
        print(f"apt: error: {exc}", file=sys.stderr)
        return 1
    from apt.trainops.distributed import shutdown_distributed
    from apt.trainops.reliability.anomaly import AnomalyStop
    try:
        try:
            summary = trainer.train()
        except AnomalyStop as exc:   # every rank stops alike, weights and checkpoints finite
            if trainer.runtime.is_main:
                print(f"apt: error: {exc}", file=sys.stderr)
            return EXIT_ANOMALY
        if summary.get("preempted"):
            return EXIT_PREEMPTED
        if args.benchmark:
            line = format_benchmark(trainer, benchmark_summary(trainer, args.warmup))
            if trainer.runtime.is_main:
                print(line, flush=True)
                trainer.artifacts.save_text("benchmark.txt", line)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
