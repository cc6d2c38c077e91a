"""Quiet, useful output: known-harmless library warnings off, our own log lines on."""
from __future__ import annotations

import logging
import os
import warnings

# Import-time notices from Megatron-core that say nothing actionable on a CPU or non-Apex
# install (we choose the local spec and torch optimizers on purpose).
_KNOWN_NOISE = [
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"full scope is deprecated",
]


def configure_logging(level: int = logging.WARNING) -> None:
    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # DeepSpeed picks its accelerator at import; saying "cpu" up front avoids its warning that
    # it could not find a GPU, without changing what it would pick.
    if not os.environ.get("DS_ACCELERATOR"):
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
