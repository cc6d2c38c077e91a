"""``trainops doctor``: is this machine ready for a run of this profile? One table, one verdict.

    python -m apt doctor --profile 7b --nproc-per-node 8      # exit 0: ready; 2: a run would fail

Rows: package versions against what setup.py requires, the CPU compatibility layer, CUDA and
NCCL, the parallel plan, memory against the plan's estimate and the checkpoint disk (the same
checks a run refuses to start without: apt/trainops/reliability/preflight.py), /dev/shm, the
master port and TORCH_EXTENSIONS_DIR. FAIL means a run would fail; WARN that it may run worse than it could.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
from importlib import metadata
from pathlib import Path

from apt.core.config import ConfigError, load_profile
from apt.trainops.reliability.preflight import (FAIL, OK, WARN, Check, checkpoint_dir_check, gib,
                                                memory_check)

PACKAGES = ("torch", "megatron-core", "deepspeed")
MIB = 2 ** 20


def run(args) -> int:
    cfg = load_profile(args.profile, args.overrides)
    rows = checks(cfg, args.nodes, args.nproc_per_node)
    width = max(len(r.name) for r in rows)
    print(f"doctor: profile {cfg.name} ({' <- '.join(reversed(cfg.sources))})")
    for r in rows:
        where = f"{r.source}: " if r.source and r.source not in r.detail else ""
        print(f"  {r.name:<{width}}  {r.status:<4}  {where}{r.detail}")
    _print_library_warnings()
    failed = [r for r in rows if r.status == FAIL]
    warned = [r for r in rows if r.status == WARN]
    if failed:
        print(f"verdict: NOT READY, a run would fail: {', '.join(r.name for r in failed)}")
        return 2
    print("verdict: ready" + (f", {len(warned)} warning(s): {', '.join(r.name for r in warned)}"
                              if warned else ""))
    return 0


def _print_library_warnings() -> None:
    """The libraries' warnings that runs keep off the console (apt/core/logging.py), once."""
    try:   # what the engines import, so that the libraries' import-time warnings are here
        import deepspeed  # noqa: F401
        import megatron.core.optimizer  # noqa: F401
    except Exception:  # noqa: BLE001 - the package rows above already say what is broken
        pass
    from apt.core.logging import hidden_warnings
    hidden = hidden_warnings()
    if hidden:
        print(f"library warnings ({len(hidden)}, kept off the console during runs):")
        for line in hidden:
            print(f"  {line}")


def checks(cfg, nodes: int = 1, per_node: int | None = None) -> list[Check]:
    import torch
    cuda = torch.cuda.is_available()
    per_node = per_node or (torch.cuda.device_count() if cuda else 1)
    rows = [_python(), *(_package(p) for p in PACKAGES), _transformer_engine(cuda),
            _cpu_compat(cuda), _cuda(cuda, per_node)]
    plan_row, plan = _plan(cfg, nodes * per_node, per_node, "cuda" if cuda else "cpu")
    rows.append(plan_row)
    if plan is not None:
        from apt.trainops.checkpoints.directory import checkpoint_save_dir
        rows += [memory_check(cfg, plan, per_node),
                 checkpoint_dir_check(cfg, plan, checkpoint_save_dir(cfg))]
    rows += [_shm(), _master_port(), _extensions_dir()]
    return rows


def _python() -> Check:
    import sys
    return Check("python", OK, sys.version.split()[0])


def _required(package: str):
    """setup.py's requirement for a package, read from the installed distribution."""
    from packaging.requirements import Requirement
    try:
        for spec in metadata.requires("apt-trainops") or []:
            req = Requirement(spec)
            if req.name == package and not req.marker:
                return req
    except metadata.PackageNotFoundError:   # run from a checkout without installing
        pass
    return None


def _package(package: str) -> Check:
    req = _required(package)
    wanted = f" (setup.py: {req.specifier})" if req and req.specifier else ""
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return Check(package, FAIL, f"not installed{wanted}: pip install -e .")
    if req and req.specifier and not req.specifier.contains(version, prereleases=True):
        return Check(package, FAIL, f"{version} is outside{wanted}")
    return Check(package, OK, version + wanted)


def _transformer_engine(cuda: bool) -> Check:
    try:
        version = metadata.version("transformer-engine")
    except metadata.PackageNotFoundError:
        if cuda:
            return Check("transformer-engine", WARN, "not installed: Megatron's local layers "
                         "and unfused attention (pip install -e '.[gpu]')")
        return Check("transformer-engine", OK, "not installed (used on CUDA only)")
    return Check("transformer-engine", OK, version)


def _cpu_compat(cuda: bool) -> Check:
    from apt.core import cpu_compat
    if cuda:
        return Check("cpu compat layer", OK, "not used: CUDA is available (Megatron's own "
                     "CUDA paths)")
    state = "active in this process" if cpu_compat.is_active() else "activates at start-up"
    mismatches = cpu_compat.check_versions()
    if mismatches:
        return Check("cpu compat layer", WARN, f"{state} (no CUDA); " + "; ".join(mismatches))
    tested = ", ".join(f"{k} {v}" for k, v in cpu_compat.TESTED_VERSIONS.items())
    return Check("cpu compat layer", OK, f"{state} (no CUDA); versions tested ({tested})")


def _cuda(cuda: bool, per_node: int) -> Check:
    import torch
    if not cuda:
        if torch.version.cuda is None and shutil.which("nvidia-smi"):
            return Check("cuda / nccl", WARN, f"torch {torch.__version__} is a CPU build but "
                         f"nvidia-smi is here: install a CUDA build to use the GPUs")
        return Check("cuda / nccl", OK, "no CUDA device: CPU run, gloo backend")
    count = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() \
        else None
    detail = (f"CUDA {torch.version.cuda}, {count} x {', '.join(names)}, "
              f"NCCL {nccl or 'not available'}")
    if per_node > count:
        return Check("cuda / nccl", FAIL, f"{per_node} processes per node but {count} GPU(s): "
                     + detail)
    if nccl is None:
        return Check("cuda / nccl", FAIL, detail + ": multi-GPU runs need NCCL")
    return Check("cuda / nccl", OK, detail)


def _plan(cfg, world: int, per_node: int, device: str):
    from apt.trainops.distributed.plan import make_plan
    try:
        plan = make_plan(cfg, world, per_node, device_type=device)
    except ConfigError as exc:
        return Check("plan", FAIL, str(exc)), None
    layout = f"{plan.strategy}: TP={plan.tp} PP={plan.pp} DP={plan.dp}"
    return Check("plan", OK, f"{world} {device} process(es), {layout}, "
                 f"{plan.params_total / 1e6:,.1f}M parameters, "
                 f"{gib(plan.memory.total)} per process"), plan


def _shm() -> Check:
    """DataLoader workers pass batches through /dev/shm and DeepSpeed's CPU collectives use
    it; containers default to 64 MiB (docker run --shm-size)."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return Check("/dev/shm", WARN, "missing: DataLoader workers (data.num_workers > 0) fail")
    try:
        with tempfile.NamedTemporaryFile(dir=shm, prefix="apt-doctor-"):
            pass
    except OSError as exc:
        return Check("/dev/shm", FAIL, f"not writable ({exc.strerror or exc})")
    free = shutil.disk_usage(shm).free
    if free < 1024 * MIB:
        return Check("/dev/shm", WARN, f"{free / MIB:.0f} MiB free: DataLoader workers may die "
                     f"(bus error); give the container --shm-size=8g or more")
    return Check("/dev/shm", OK, f"{gib(free)} free")


def _master_port() -> Check:
    """The rendezvous address the launcher will use: its port must be free on the master
    node (torchrun and the deepspeed launcher host the store there)."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", 29500))
    where = f"{addr}:{port} (MASTER_ADDR/MASTER_PORT)"
    try:
        resolved = socket.gethostbyname(addr)
    except OSError as exc:
        return Check("master port", FAIL, f"{where}: the address does not resolve ({exc})")
    local = ipaddress.ip_address(resolved).is_loopback or resolved in _local_addresses()
    if not local:
        return Check("master port", OK, f"{where}: another node hosts it (resolves to "
                     f"{resolved}); not checked from here")
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError as exc:
            return Check("master port", FAIL, f"{where}: port in use ({exc.strerror or exc}); "
                         f"set MASTER_PORT or torchrun --master_port to a free one")
    return Check("master port", OK, f"{where}: free")


def _local_addresses() -> set[str]:
    try:
        return set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        return set()


def _extensions_dir() -> Check:
    """DeepSpeed compiles its CPU ops (Adam, shm collectives) into TORCH_EXTENSIONS_DIR."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    path = Path(configured or Path.home() / ".cache" / "torch_extensions")
    name = "TORCH_EXTENSIONS_DIR" + ("" if configured else " (unset)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".apt-doctor-"):
            pass
    except OSError as exc:
        return Check("torch extensions", FAIL, f"{path} ({name}): not writable "
                     f"({exc.strerror or exc}); DeepSpeed cannot build its ops: set "
                     f"TORCH_EXTENSIONS_DIR to a writable directory")
    return Check("torch extensions", OK, f"{path} ({name}): writable")
