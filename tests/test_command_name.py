"""The console script is ``trainops``, never ``apt`` (Debian/Ubuntu's package manager, which a
virtualenv on PATH would shadow); ``python -m apt`` stays."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _console_scripts() -> list[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            return ast.literal_eval(node.value)["console_scripts"]
    raise AssertionError("setup.py declares no entry_points")


def test_console_script_is_trainops_not_apt():
    names = {spec.split("=")[0].strip() for spec in _console_scripts()}
    assert names == {"trainops"}, names
    assert "trainops=apt.cli:main" in [s.replace(" ", "") for s in _console_scripts()]
