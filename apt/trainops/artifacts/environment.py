"""What a run ran on: package versions, Python, the host and its accelerators (environment.json)."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import psutil
import torch

PACKAGES = ("apt-trainops", "torch", "megatron-core", "deepspeed", "numpy", "transformer-engine",
            "tensorboard", "wandb", "mlflow", "matplotlib")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict:
    """Installed versions of the packages a run depends on (absent ones left out)."""
    return {p: v for p in PACKAGES if (v := _version(p)) is not None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def collect_environment(world_size: int | None = None, launcher: str | None = None) -> dict:
    env = {
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "git_commit": _git_commit(),
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count(),
                "torch_threads": torch.get_num_threads()},
        "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 2),
        "world_size": world_size,
        "launcher": launcher,
    }
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        env["gpu"] = {"count": len(props), "names": [p.name for p in props],
                      "memory_gib": [round(p.total_memory / 2 ** 30, 2) for p in props],
                      "cuda": torch.version.cuda}
    else:
        env["gpu"] = None
    return env
