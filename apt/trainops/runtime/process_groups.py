"""setup_distributed: process group, Megatron-core parallel groups from the plan, seeded RNGs."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import random
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .launcher_env import LaunchEnv, detect_launch_env, export

_RUNTIME: "Runtime | None" = None
# DistributedConfig.rendezvous_timeout_s's default, for callers without a profile.
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0


class RendezvousError(RuntimeError):
    """The ranks did not all meet at the rendezvous store within the timeout."""


@dataclass
class Runtime:
    env: LaunchEnv
    device: torch.device
    backend: str
    tp: int = 1
    pp: int = 1
    vp: int = 1
    ep: int = 1
    cp: int = 1

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state
        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state
        return parallel_state.get_data_parallel_world_size()


def setup_distributed(backend: str | None = None, world_size: int | None = None,
                      rank: int | None = None, plan=None, seed: int = 1234,
                      rendezvous_timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S) -> Runtime:
    """Start (or join) the process group and build Megatron-core's groups from ``plan``.

    Works under ``deepspeed``, ``torchrun``, ``srun`` and plain ``python`` (a one-process
    group). ``backend`` defaults to NCCL on CUDA and gloo on CPU. Idempotent. A rendezvous
    that does not complete within ``rendezvous_timeout_s`` raises RendezvousError, and the
    worker dies with its launcher (apt/trainops/reliability/lifetime.py)."""
    global _RUNTIME
    if _RUNTIME is not None:
        if plan is not None:
            _reconfigure(_RUNTIME, plan)
        return _RUNTIME
    env = detect_launch_env()
    if rank is not None or world_size is not None:
        env = dataclasses.replace(env, rank=env.rank if rank is None else rank,
                                  world_size=env.world_size if world_size is None else world_size)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        from apt.core import cpu_compat
        cpu_compat.activate()
        device = torch.device("cpu")
    if backend == "nccl" and not cuda:
        # The seed's scripts say backend='nccl'; without a GPU the same script runs on gloo.
        logging.getLogger(__name__).warning("NCCL needs CUDA and there is no GPU: using gloo")
        backend = "gloo"
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        export(env)
        timeout = datetime.timedelta(minutes=int(os.environ.get("APT_DIST_TIMEOUT_MIN", 30)))
        # One process needs no rendezvous: an in-memory store avoids racing for a TCP port.
        if env.launcher == "python" and env.world_size == 1:
            store = dist.HashStore()
        else:
            store = _rendezvous(env, rendezvous_timeout_s)
            store.set_timeout(timeout)   # from here on: the collectives' timeout
            store = _per_attempt(store)
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=timeout, store=store)
    degrees = dict(tp=1, pp=1, vp=1, ep=1, cp=1)
    if plan is not None:
        degrees = dict(tp=plan.tp, pp=plan.pp, vp=plan.vp, ep=plan.ep, cp=plan.cp)
    _init_megatron_groups(**degrees)
    runtime = Runtime(env=env, device=device, backend=backend, **degrees)
    seed_everything(seed)
    _RUNTIME = runtime
    return runtime


def _per_attempt(store):
    """Under torchrun, its agent's TCPStore outlives the workers of a restart
    (--max-restarts), and init_process_group would reuse the keys of the attempt before:
    gloo then connects to the dead workers' addresses ("Connection refused", or a hang).
    The keys of each attempt go under a prefix of their own."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    return dist.PrefixStore(f"apt/attempt-{attempt}/", store)


def _rendezvous(env: LaunchEnv, timeout_s: float):
    """The env:// store torch would create (the launcher's agent store under torchrun, else
    hosted by rank 0), with its own timeout: connecting to it and waiting for every rank to
    arrive end after ``timeout_s`` with one line naming the address."""
    deadline = time.monotonic() + timeout_s
    hosted_here = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        if not hosted_here:
            # Wait for the store to listen here, in Python: TCPStore's own retries print a C++
            # stack trace per attempt.
            _wait_for_listener(env.master_addr, env.master_port, deadline)
        remaining = max(1.0, deadline - time.monotonic())
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size,
                                           timeout=datetime.timedelta(seconds=remaining)))
    except (dist.DistStoreError, RuntimeError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise RendezvousError(
            f"rendezvous at {env.master_addr}:{env.master_port} did not complete within "
            f"{timeout_s:g} s (rank {env.rank} of {env.world_size}, launcher {env.launcher}): "
            f"{reason}; is the launcher alive and every node started? "
            f"(training.distributed.rendezvous_timeout_s)") from None
    return store


def _wait_for_listener(host: str, port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise OSError(f"nothing listens there ({exc.strerror or exc})") from None
            time.sleep(0.5)


def collective_device() -> torch.device:
    """Where the small tensors of a collective must live: the GPU with NCCL, the CPU with gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ranks_raising(*flags: bool) -> list[int]:
    """For each flag, how many ranks raise it: one all-reduce for all of them."""
    if not dist.is_initialized():
        return [int(flag) for flag in flags]
    counts = torch.tensor([int(flag) for flag in flags], device=collective_device())
    dist.all_reduce(counts)
    return counts.tolist()


def ensure_runtime() -> Runtime:
    """The running runtime, or a one-process one (so ``APTModel()`` works in a notebook)."""
    return _RUNTIME or setup_distributed()


def current_runtime() -> Runtime | None:
    return _RUNTIME


def _reconfigure(runtime: Runtime, plan) -> None:
    """A later plan in the same process (a notebook, a test sweeping layouts): rebuild
    Megatron's groups when its degrees differ from the ones in place."""
    from megatron.core import parallel_state
    wanted = dict(tp=plan.tp, pp=plan.pp, vp=plan.vp, ep=plan.ep, cp=plan.cp)
    current = dict(tp=runtime.tp, pp=runtime.pp, vp=runtime.vp, ep=runtime.ep, cp=runtime.cp)
    if wanted == current:
        return
    parallel_state.destroy_model_parallel()
    _init_megatron_groups(**wanted)
    for name, value in wanted.items():
        setattr(runtime, name, value)


def _init_megatron_groups(tp, pp, vp, ep, cp) -> None:
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
        context_parallel_size=cp, expert_model_parallel_size=ep)


def seed_everything(seed: int) -> None:
    """Same seed on every data-parallel rank (identical initial weights); pipeline stages
    differ so their layers are not initialised alike (Megatron-LM's convention)."""
    from megatron.core import parallel_state, tensor_parallel
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown_distributed() -> None:
    """Tear down groups. Every process must call this: without destroy_process_group about one
    run in five dies at exit on gloo ("terminate called without an active exception")."""
    global _RUNTIME
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _RUNTIME = None
