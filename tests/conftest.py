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
