"""Quiet, useful output: known-harmless library warnings off the console, our own log lines on.

``quiet_library_warnings()`` runs first thing in every entry point (launch/train.py, the
``trainops`` command), before the libraries are imported, since most of their notices are
import-time warnings: Megatron-core's four "Transformer Engine and Apex are not installed"
(we choose the local spec and torch optimizers on purpose) and deprecation notices raised
inside installed libraries, which nothing a user does can change. They are kept, not lost:
``hidden_warnings()`` lists each once, and ``trainops doctor`` prints them. Standard library
only: the ``trainops`` command imports this before deciding whether it needs torch at all.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

_KNOWN_NOISE = re.compile(r"Apex is not installed|Transformer Engine and Apex are not installed"
                          r"|full scope is deprecated")
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_LIBRARY_DIRS = ("site-packages", "dist-packages", os.path.dirname(os.__file__))
_APT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # ours: always shown
_hidden: dict[str, None] = {}   # "Category: message (file:line)", each once, in order


def _is_library_noise(message, category, filename: str) -> bool:
    if _KNOWN_NOISE.search(str(message)):
        return True
    in_library = (any(part in filename for part in _LIBRARY_DIRS)
                  and not os.path.abspath(filename).startswith(_APT_DIR))
    return issubclass(category, _DEPRECATIONS) and in_library


def quiet_library_warnings() -> None:
    """Keep the libraries' known-harmless warnings off the console (see the module doc); other
    warnings, ours and deprecations our own code triggers, are shown as before. Idempotent."""
    shown = warnings.showwarning
    if getattr(shown, "_apt_quiet", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_library_noise(message, category, filename):
            where = filename.split("site-packages/")[-1]
            _hidden.setdefault(f"{category.__name__}: {' '.join(str(message).split())} "
                               f"({where}:{lineno})")
            return
        shown(message, category, filename, lineno, file, line)

    showwarning._apt_quiet = True
    warnings.showwarning = showwarning


def hidden_warnings() -> list[str]:
    """The library warnings kept off the console in this process, each once."""
    return list(_hidden)


def configure_logging(level: int = logging.WARNING) -> None:
    quiet_library_warnings()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # DeepSpeed picks its accelerator at import; saying "cpu" up front avoids its warning that
    # it could not find a GPU, without changing what it would pick.
    if not os.environ.get("DS_ACCELERATOR"):
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
