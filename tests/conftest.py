"""Every test module leaves the pytest process as it found it."""
import os

import pytest


@pytest.fixture(autouse=True, scope="module")
def _leave_the_process_as_found():
    """A Trainer or APTModel built in this process starts a one-process group that exports
    RANK/WORLD_SIZE/MASTER_* into os.environ. When a module started it, end it and restore the
    environment, so later tests neither hand WORLD_SIZE=1 to their launches (SLURM-style tasks
    in test_train_multiprocess.py) nor find a group without its environment."""
    from apt.trainops.distributed import shutdown_distributed
    from apt.trainops.distributed.runtime import current_runtime
    saved, had_runtime = dict(os.environ), current_runtime() is not None
    yield
    if not had_runtime and current_runtime() is not None:
        shutdown_distributed()
    if not had_runtime:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def arith_sft_checkpoint(tmp_path_factory):
    """The arith-sft-base profile's checkpoints directory (the tiny model fine-tuned on sums
    until it answers at least 25% of the held-out sums: training.target, 450 steps and 0.336
    on this machine): the starting point of the DPO and GRPO gain tests, trained once per
    test session."""
    from apt.core.config import load_profile
    from apt.trainops.engine import Finetuner
    root = tmp_path_factory.mktemp("arith-sft-base")
    Finetuner.from_config(load_profile("arith-sft-base", [
        f"training.checkpoints.dir={root / 'checkpoints'}", f"output.dir={root / 'runs'}",
        "output.sample_tokens=0"])).train()
    return root / "checkpoints"


@pytest.fixture(autouse=True, scope="session")
def _fused_kernels_built():
    """Build the CPU kernels (model.kernels: auto) once, before any test: otherwise the first
    test that builds a model, or the first launch's workers, would pay the build (about a
    minute) inside their own timeouts. The builds land in TORCH_EXTENSIONS_DIR, where every
    later process finds them."""
    from apt.kernels import resolve
    resolve("auto", "cpu")
