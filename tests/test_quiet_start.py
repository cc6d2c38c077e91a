"""Quiet by default (issue 30): ``trainops --help`` and argument errors answer without
importing torch (it took 15.7 s); the libraries' known-harmless warnings (Megatron's "Transformer
Engine and Apex are not installed", deprecations inside installed libraries) stay off the
console and ``trainops doctor`` lists them once; our own warnings still show."""
import subprocess
import sys
import warnings
from pathlib import Path

from apt.core import logging as apt_logging

REPO = Path(__file__).resolve().parents[1]


def _imports_torch(*argv) -> tuple[bool, subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    return "torch" in imported, proc


def test_help_and_argument_errors_never_import_torch():
    torch, proc = _imports_torch("-m", "apt", "--help")
    assert proc.returncode == 0 and "preprocess" in proc.stdout and not torch
    torch, proc = _imports_torch("-m", "apt", "preprocess", "--help")
    assert proc.returncode == 0 and "--tokenizer-path" in proc.stdout and not torch
    torch, proc = _imports_torch("-m", "apt", "doctor", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr and not torch
    torch, proc = _imports_torch("launch/train.py", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr and not torch


def test_library_noise_is_kept_off_the_console_and_listed_once(capsys):
    apt_logging.quiet_library_warnings()
    apt_logging.quiet_library_warnings()   # idempotent: one hook
    library = "/venv/lib/python3.11/site-packages/megatron/core/optimizer/__init__.py"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        apt_logging.quiet_library_warnings()   # catch_warnings restored the original hook
        for _ in range(2):
            warnings.warn_explicit("Transformer Engine and Apex are not installed. Falling "
                                   "back to Torch optimizers.", UserWarning, library, 24)
        warnings.warn_explicit("old_api is deprecated", FutureWarning, library, 30)
        warnings.warn_explicit("our own deprecation", FutureWarning, __file__, 1)
        warnings.warn_explicit("a library's real problem", UserWarning, library, 40)
    assert [str(w.message) for w in shown] == ["our own deprecation", "a library's real problem"]
    hidden = [line for line in apt_logging.hidden_warnings() if "megatron/core/optimizer" in line]
    assert hidden == [
        "UserWarning: Transformer Engine and Apex are not installed. Falling back to Torch "
        "optimizers. (megatron/core/optimizer/__init__.py:24)",
        "FutureWarning: old_api is deprecated (megatron/core/optimizer/__init__.py:30)"]
    from apt.trainops.reliability.doctor import _print_library_warnings
    _print_library_warnings()
    out = capsys.readouterr().out
    assert "kept off the console during runs" in out
    assert out.count("Transformer Engine and Apex are not installed") == 1
