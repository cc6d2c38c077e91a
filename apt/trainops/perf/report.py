"""`trainops plan --gpu ...`: the plan's layout through the performance model, the layout
search, goodput and calibration, as the lines the command prints."""
from __future__ import annotations

import time
from dataclasses import replace

from apt.core.config import ConfigError
from .hardware import gpu_names, load_hardware


def add_arguments(parser) -> None:
    parser.add_argument("--gpu", choices=gpu_names(), default=None,
                        help="predict step time, tokens/s, MFU and goodput on this GPU")
    parser.add_argument("--search", action="store_true",
                        help="rank the layouts that fit by predicted tokens/s (needs --gpu)")
    parser.add_argument("--tokens", type=float, default=None,
                        help="token budget (default: training.max_steps x tokens per step)")
    parser.add_argument("--failures-per-gpu-day", type=float, default=None,
                        help="interruptions per GPU-day (default: Llama 3's 419 in 54 days on "
                             "16,384 GPUs)")
    parser.add_argument("--storage-gbs", type=float, default=None,
                        help="checkpoint storage bandwidth, GB/s (default: Llama 3's 2,000)")
    parser.add_argument("--restart-min", type=float, default=10.0,
                        help="minutes from a failure to loading the checkpoint (default 10)")
    parser.add_argument("--network-gbps", type=float, default=None,
                        help="scale-out bandwidth per GPU between nodes, Gb/s (its InfiniBand "
                             "or RoCE NIC; default: the GPU's DGX/HGX datasheet, 400 for H100)")
    parser.add_argument("--nvlink-gbs", type=float, default=None,
                        help="NVLink bandwidth per GPU inside a node, GB/s one way (default: "
                             "the datasheet's, 450 for H100 SXM)")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="tools/gpu_check.py's gpu_check.json: GEMM rate from it, and the "
                             "model's error on its measured step")


def check_arguments(args) -> None:
    if args.search and not args.gpu:
        raise ConfigError("--search needs --gpu (which GPU to rank the layouts for)")
    for flag in ("tokens", "failures_per_gpu_day", "storage_gbs", "restart_min",
                 "network_gbps", "nvlink_gbs"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: needs a number > 0, got {value:g}")


def _with_network(hw, args):
    """The GPU with the cluster's own links where the command gives them."""
    links = {}
    if args.network_gbps:
        links["network_bytes_s"] = args.network_gbps / 8 * 1e9
    if args.nvlink_gbs:
        links["nvlink_bytes_s"] = args.nvlink_gbs * 1e9
    return replace(hw, **links) if links else hw


def _network_line(hw) -> str:
    return (f"network      NVLink {hw.nvlink_bytes_s / 1e9:,.0f} GB/s per GPU in {hw.nvlink_domain}"
            f"-GPU domains, {hw.network_bytes_s * 8 / 1e9:,.0f} Gb/s per GPU between nodes "
            f"(--nvlink-gbs, --network-gbps)")


def _ranked(cfg, world: int, gpn: int, hw) -> tuple[list, str]:
    from .search import search
    start = time.perf_counter()
    top, tried, fit = search(cfg, world, gpn, hw)
    return top, (f"search       {tried} layouts tried, {fit} fit in {hw.memory_gib:g} GiB "
                 f"({time.perf_counter() - start:.1f} s); top {len(top)}:")


def machine(args) -> tuple:
    """(the GPU the command predicts for, the calibration's line or None): the data file's
    GPU, with a calibration report's measured rates where it is the same GPU, and the
    command's links. Built once per command, for the plan's prediction and the search alike."""
    from .calibration import calibrate      # here: the parser is built for every command
    hw, line = load_hardware(args.gpu), None
    if args.calibration:
        cal = calibrate(args.calibration)
        line = cal.describe()
        if cal.hardware.name == hw.name:
            hw = cal.hardware
    return _with_network(hw, args), line


def searched_plan(cfg, world: int, gpn: int, hw, refused: ConfigError) -> tuple:
    """(the search's first pick, the search, the note saying why) for a profile whose own
    layout cannot run at this scale; refused again (the same error) when none fits either."""
    searched = _ranked(cfg, world, gpn, hw)
    if not searched[0]:
        raise refused
    note = (f"note         the profile's layout does not run here ({refused}); the plan below "
            f"is the search's first pick")
    return searched[0][0].plan, searched, note


def performance_lines(cfg, plan, args, hw, calibrated, searched=None) -> list[str]:
    """What `plan --gpu` prints after the plan, on ``hw`` (``machine(args)``); the caller
    has checked the options (``check_arguments``)."""
    if not args.gpu:
        return []
    from .goodput import goodput
    from .predict import predict
    from .shape import layout_from_plan, shape_from_config
    lines = [calibrated] if calibrated else []
    shape = shape_from_config(cfg.model, cfg.data.seq_length)
    pred = predict(shape, layout_from_plan(plan), hw)
    lines += [f"performance  {hw.name} x {plan.world_size} ({hw.source.split(';')[0]})",
              _network_line(hw),
              pred.describe()]
    tokens = args.tokens or cfg.training.max_steps * plan.tokens_per_step
    train_s = tokens / (pred.tokens_per_s_per_gpu * plan.world_size)
    g = goodput(gpus=plan.world_size, checkpoint_bytes=plan.checkpoint_bytes, train_s=train_s,
                rate_per_gpu_day=args.failures_per_gpu_day,
                storage_bytes_s=args.storage_gbs * 1e9 if args.storage_gbs else None,
                restart_s=args.restart_min * 60)
    lines += [f"tokens       {tokens:,.0f} (checkpoint {plan.checkpoint_bytes / 1e9:,.0f} GB)",
              g.describe()]
    if args.search:
        top, header = searched or _ranked(cfg, plan.world_size, plan.gpus_per_node, hw)
        lines.append(header)
        lines += [f"  {i + 1}. {c.line()}" for i, c in enumerate(top)]
    return lines
