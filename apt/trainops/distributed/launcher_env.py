"""Where am I? Rank, world size and rendezvous address from whichever launcher started us."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str      # deepspeed | torchrun | slurm | python
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def detect_launch_env(environ=None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" in env and "RANK" not in env:
        # srun starts one task per rank; MASTER_ADDR comes from the sbatch script
        # (launch/slurm.sbatch sets it to the first node of the allocation).
        return LaunchEnv("slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                         int(env["SLURM_NTASKS"]), env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", 29500)))
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun sets TORCHELASTIC_*; the deepspeed launcher does not.
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        return LaunchEnv(launcher, int(env["RANK"]), int(env.get("LOCAL_RANK", 0)),
                         int(env["WORLD_SIZE"]), env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", 29500)))
    return LaunchEnv("python", 0, 0, 1, "127.0.0.1", free_port())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export(env: LaunchEnv) -> None:
    """torch.distributed's env:// rendezvous reads these names, whatever the launcher was."""
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank),
                      WORLD_SIZE=str(env.world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
