#!/usr/bin/env python
"""Score a profile's model on its held-out SFT chats: assistant-token loss and exact-match of
greedy answers (apt/trainops/eval/generation.py), one process.

    python launch/score_chats.py --profile sft-tiny                        # weights at step 0
    python launch/score_chats.py --profile sft-tiny \\
        --set training.init_from=runs/<run>/model/dist                      # trained weights

The model is built exactly as the Trainer builds it (same seed, same initial weights), so the
first line is the step-0 score of a run of the same profile.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from apt.cli import EXIT_CONFIG_ERROR, add_profile_arguments  # noqa: E402
from apt.core.config import ConfigError, load_profile  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_profile_arguments(parser)
    parser.add_argument("--max-records", type=int, default=None,
                        help="score only the first N held-out chats")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the scores here")
    args = parser.parse_args(argv)
    try:
        config = load_profile(args.profile, args.overrides)
        if config.data.corpus != "sft":
            raise ConfigError("scoring chats needs data.corpus 'sft'", key="data.corpus")
        from apt.trainops.trainers import Trainer
        from apt.trainops.eval.generation import ChatScorer
        trainer = Trainer.from_config(config)
        scorer = ChatScorer.from_data(config.data, trainer.tokenizer, args.max_records)
    except ConfigError as exc:
        print(f"apt: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    scores = scorer(trainer.model)
    weights = config.training.init_from or f"initial weights (seed {config.training.seed})"
    print(f"chats | {args.profile} | {weights} | {scores['records']} held-out chats | assistant-"
          f"token loss {scores['assistant_loss']:.4f} nats over {scores['assistant_tokens']} "
          f"tokens | exact-match {scores['exact_match']:.3f}")
    tasks = {k[len('exact_match_'):]: v for k, v in scores.items() if k.startswith("exact_match_")}
    if tasks:
        print("chats | exact-match per task | " + ", ".join(f"{k} {v:.3f}"
                                                           for k, v in tasks.items()))
    for sample in scores["samples"]:
        print(f"chats | sample | {sample['prompt']!r} -> {sample['generated']!r} (expected "
              f"{sample['expected']!r})")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")
    from apt.trainops.distributed import shutdown_distributed
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
