"""The ``trainops`` command (also ``python -m apt``): ``trainops plan`` (layout and memory),
``trainops profile`` (resolved config), ``trainops preprocess`` (text/JSONL/Parquet -> indexed
token files), ``trainops benchmark`` (timed training steps, one summary line), ``trainops
export-hf`` / ``trainops import-hf`` (Hugging Face Llama/Mixtral directories <-> APT weights),
``trainops checkpoints`` (list and verify), ``trainops doctor`` (is this machine ready).

It is not called ``apt``: on Debian and Ubuntu (every GPU node) that name is the system's
package manager, which a virtualenv on PATH would shadow."""
from __future__ import annotations

import argparse
import os
import sys

from apt.core.config import ConfigError, load_profile
from apt.core.logging import quiet_library_warnings

from apt.core.exit_codes import EXIT_CONFIG_ERROR
# Nothing at module level imports torch (seconds): `trainops --help` and an argument error
# answer at once; each command imports what it needs when it runs.


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="tiny", help="profile name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a profile key (repeatable)")


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """``trainops preprocess`` (also ``python -m apt preprocess``). Defined here and passed down
    to preprocess.py's ``run``: importing that module imports torch (through its package), which
    ``--help`` must not wait for."""
    parser.add_argument("inputs", nargs="+", help="files or directories (text, .jsonl, .parquet)")
    parser.add_argument("--output", "-o", required=True, help="output prefix (writes .bin, .idx)")
    parser.add_argument("--format", dest="fmt", default="auto",
                        choices=["auto", "text", "jsonl", "parquet"])
    parser.add_argument("--field", default="text", help="JSONL field / Parquet column")
    parser.add_argument("--tokenizer", default="byte", choices=["byte", "hf", "sentencepiece"])
    parser.add_argument("--tokenizer-path", default=None)
    parser.add_argument("--train-bpe", type=int, default=None, metavar="VOCAB",
                        help="train a byte-level BPE of this size on the inputs first")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes per node (default: the GPUs found, else 1)")


def _plan(args) -> int:
    from apt.trainops.distributed.plan import make_plan
    cfg = load_profile(args.profile, args.overrides)
    gpus = args.gpus_per_node or cfg.hardware.gpus_per_node
    from apt.trainops.perf.report import (check_arguments, machine, performance_lines,
                                          searched_plan)
    check_arguments(args)          # bad --gpu options refused before anything is printed
    hw, calibrated = machine(args) if args.gpu else (None, None)
    try:
        plan, searched = make_plan(cfg, args.nodes * gpus, gpus, device_type=args.device), None
    except ConfigError as exc:
        # --search answers "which layout at this scale": a profile whose own layout is for
        # another scale (profiles/70b.yaml's is for 64 GPUs) still gets the ranking, shown
        # with the first pick as the plan, and the reason the profile's layout was refused.
        if not args.search:
            raise
        plan, searched, note = searched_plan(cfg, args.nodes * gpus, gpus, hw, exc)
        print(note)
    print(f"profile      {cfg.name} ({' <- '.join(reversed(cfg.sources))}), hash {cfg.config_hash}")
    print(plan.describe())
    for line in performance_lines(cfg, plan, args, hw, calibrated, searched):
        print(line)
    if args.memory_table:
        from apt.trainops.distributed.memory_table import format_memory_table, memory_table
        counts = sorted({1, args.nodes * gpus})
        print()
        print(format_memory_table(cfg, memory_table(cfg, counts, device_type=args.device)))
    return 0


def _profile(args) -> int:
    import yaml
    from apt.core.config import config_to_dict
    cfg = load_profile(args.profile, args.overrides)
    print(f"# {cfg.name}: resolved from {' <- '.join(reversed(cfg.sources))}")
    print(f"# config hash {cfg.config_hash}")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _preprocess(args) -> int:
    from apt.trainops.data.sources.preprocess import run
    return run(args)  # a DataError is a ConfigError: one line, exit 2 (below)


def _benchmark(args) -> int:
    from apt.core.logging import configure_logging
    from apt.trainops.distributed import shutdown_distributed
    from apt.trainops.trainers.benchmark import run_benchmark
    configure_logging()
    cfg = load_profile(args.profile, args.overrides)
    try:
        run_benchmark(cfg, steps=args.steps, warmup=args.warmup)
    finally:
        shutdown_distributed()
    return 0


def _checkpoints(args) -> int:
    """List a checkpoint directory: step, size, lineage, and whether it would load (the
    verification loading runs) and why not. Exit code 2 if any would not."""
    from apt.trainops.checkpoints import CheckpointManager
    entries = CheckpointManager(args.dir).list()
    if not entries:
        print(f"no checkpoints in {args.dir}")
    for e in entries:
        size = f"{e['bytes'] / 2**20:9.1f} MiB" if e["bytes"] is not None else " " * 13
        lineage = f"lineage {e['lineage'] or '-':16s}"
        print(f"{e['name']:24s} step {e['step']:>8d} {size}  {lineage}  "
              f"{'ok' if e['ok'] else 'NOT LOADABLE: ' + ' '.join(e['reason'].split())}")
    return 0 if all(e["ok"] for e in entries) else EXIT_CONFIG_ERROR


def _doctor(args) -> int:
    from apt.trainops.reliability.doctor import run
    return run(args)


def _export_hf(args) -> int:
    from apt.model.architectures import APTModel
    from apt.trainops.interop import export_hf, hf_eos_ids
    cfg = load_profile(args.profile, args.overrides)
    tokenizer, source = _trained_tokenizer(args.weights, cfg)
    out = export_hf(args.weights, cfg.model, args.out, tokenizer=tokenizer,
                    model_class=APTModel)
    print(f"wrote {out} (transformers.AutoModelForCausalLM.from_pretrained loads it) with "
          f"{source} (AutoTokenizer.from_pretrained loads it; end of document = "
          f"{tokenizer.eod_id}, generate() stops at eos = {hf_eos_ids(tokenizer)}, "
          f"pad = {tokenizer.pad_id})")
    return 0


def _trained_tokenizer(weights: str, cfg):
    """The tokenizer the weights were trained with: the run directory's ``tokenizer/`` when
    the weights are in one (``<run>`` or ``<run>/model/dist``), else the profile's."""
    from pathlib import Path
    from apt.trainops.data.tokenizers.tokenizer import build_tokenizer, load_tokenizer
    for run in (Path(weights), *Path(weights).parents[:2]):
        if (run / "tokenizer" / "apt_tokenizer.json").is_file():
            return load_tokenizer(run / "tokenizer"), f"the tokenizer of {run}"
    return (build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path),
            f"the profile's {cfg.data.tokenizer} tokenizer")


def _import_hf(args) -> int:
    import yaml
    from apt.model.architectures import APTModel
    from apt.trainops.interop import import_hf_to_weights, profile_model_fields
    model = import_hf_to_weights(args.hf, args.out, APTModel)
    print(f"wrote {args.out}: start a run from it with --set training.init_from={args.out} "
          f"and this model section in the profile:")
    print(yaml.safe_dump({"model": profile_model_fields(model)}, sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()   # before any command imports the libraries that warn
    parser = argparse.ArgumentParser(prog="trainops", description="APT TrainOps")
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="print the parallel plan and memory per GPU")
    add_profile_arguments(plan)
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=None,
                      help="default: the profile's hardware.gpus_per_node")
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    from apt.trainops.perf.report import add_arguments as add_performance_arguments
    add_performance_arguments(plan)
    plan.add_argument("--memory-table", action="store_true",
                      help="also print memory per GPU for SFT, LoRA, DPO and GRPO on 1 GPU "
                           "and on this layout's GPUs")
    plan.set_defaults(func=_plan)
    profile = commands.add_parser("profile", help="print a profile fully resolved")
    add_profile_arguments(profile)
    profile.set_defaults(func=_profile)
    preprocess = commands.add_parser("preprocess", help="tokenize a corpus into .bin/.idx")
    add_preprocess_arguments(preprocess)
    preprocess.set_defaults(func=_preprocess)
    bench = commands.add_parser("benchmark", help="time N training steps after a warm-up")
    add_profile_arguments(bench)
    bench.add_argument("--steps", type=int, default=50, help="measured steps")
    bench.add_argument("--warmup", type=int, default=10, help="steps run before measuring")
    bench.set_defaults(func=_benchmark)
    export = commands.add_parser("export-hf", help="APT weights -> Hugging Face directory")
    add_profile_arguments(export)
    export.add_argument("--weights", required=True,
                        help="dist_checkpointing weights (any layout), or a run's directory")
    export.add_argument("--out", required=True, help="directory to write")
    export.set_defaults(func=_export_hf)
    imp = commands.add_parser("import-hf", help="Hugging Face directory -> APT weights")
    imp.add_argument("--hf", required=True, help="Llama/Mistral/Mixtral/Qwen2/Qwen3/Qwen3-MoE directory")
    imp.add_argument("--out", required=True, help="dist_checkpointing directory to write")
    imp.set_defaults(func=_import_hf)
    ckpts = commands.add_parser("checkpoints", help="list checkpoints and verify them")
    ckpts.add_argument("--dir", required=True, help="a checkpoint directory (save_dir)")
    ckpts.set_defaults(func=_checkpoints)
    doctor = commands.add_parser("doctor", help="check this machine before a run: a table "
                                 "and a verdict (exit 2 if a run would fail)")
    add_profile_arguments(doctor)
    add_doctor_arguments(doctor)
    doctor.set_defaults(func=_doctor)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        # A refused checkpoint is a user's error too. Its module is looked up, not imported:
        # it pulls in torch, which commands that never touch checkpoints do not need.
        checkpoints = sys.modules.get("apt.trainops.checkpoints.errors")
        if not isinstance(exc, ConfigError) and not (
                checkpoints and isinstance(exc, checkpoints.CheckpointError)):
            raise
        print(f"apt: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
