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
    from apt.trainops.runtime.process_groups import current_runtime
    saved, had_runtime = dict(os.environ), current_runtime() is not None
    yield
    if not had_runtime and current_runtime() is not None:
        shutdown_distributed()
    if not had_runtime:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def arith_sft_bases(tmp_path_factory):
    """Two starting points of the GRPO gain test, from one SFT run of the arith-sft-base
    profile (the tiny model fine-tuned on sums): stopped at its first evaluation with at least
    10% of the held-out sums right, then resumed to the profile's 25% target. A list of
    (held-out exact-match, checkpoint directory), weakest first; trained once per session."""
    from apt.core.config import load_profile
    from apt.trainops.trainers import Finetuner
    root = tmp_path_factory.mktemp("arith-sft-base")
    bases = []
    for target in (0.10, 0.25):
        trainer = Finetuner.from_config(load_profile("arith-sft-base", [
            f"training.checkpoints.dir={root / 'checkpoints'}", f"output.dir={root / 'runs'}",
            "training.checkpoints.auto_resume=true", f"training.target.value={target}",
            "output.sample_tokens=0"]))
        summary = trainer.train()
        assert trainer.stopped_at_target, summary   # max_steps allows for the jump
        bases.append((summary["val_exact_match"],
                      root / "checkpoints" / f"checkpoint-{trainer.step}"))
    return bases


@pytest.fixture(scope="session")
def arith_sft_checkpoint(arith_sft_bases):
    """The arith-sft-base profile's checkpoint at its 25% target: the starting point of the
    DPO gain test."""
    return arith_sft_bases[-1][1]


@pytest.fixture(autouse=True, scope="session")
def _fused_kernels_built():
    """Build the CPU kernels (model.kernels: auto) once, before any test: otherwise the first
    test that builds a model, or the first launch's workers, would pay the build (about a
    minute) inside their own timeouts. The builds land in TORCH_EXTENSIONS_DIR, where every
    later process finds them."""
    from apt.kernels import resolve
    resolve("auto", "cpu")
