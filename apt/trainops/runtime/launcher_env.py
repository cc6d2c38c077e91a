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
    local_world_size: int   # processes on this node (what the plan calls GPUs per node)


def detect_launch_env(environ=None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" in env and "RANK" not in env:
        # srun starts one task per rank; MASTER_ADDR comes from the sbatch script
        # (launch/slurm.sbatch sets it to the first node of the allocation).
        world = int(env["SLURM_NTASKS"])
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or world)
        return LaunchEnv("slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                         world, env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", 29500)), per_node)
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun sets TORCHELASTIC_*; the deepspeed launcher does not.
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        world = int(env["WORLD_SIZE"])
        # torchrun exports LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        per_node = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
        return LaunchEnv(launcher, int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                         per_node)
    return LaunchEnv("python", 0, 0, 1, "127.0.0.1", free_port(), 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export(env: LaunchEnv) -> None:
    """torch.distributed's env:// rendezvous reads these names, whatever the launcher was."""
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank),
                      WORLD_SIZE=str(env.world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
