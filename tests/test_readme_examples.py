"""Every ```python block of README.md and of the reference pages docs/*.md, run as a new user
would: saved as one plain script file (top-level code, no ``if __name__ == "__main__"`` guard),
the blocks in reading order (README.md first, then docs/*.md by file name; a later block may use
an earlier one's objects, e.g. the README's Finetuner fine-tunes the run its pretraining block
trained) and run with ``python script.py`` once. Runs through test_seed_examples'
machinery: each block prints ``EXAMPLE <name> OK`` after it and is its own test.

Only sizes change, by the substitutions below (each must still match the pages' blocks once, so
an edited example cannot silently escape them). The script says when it starts: a process that
re-ran the script as ``__main__`` (a spawn-mode child) would say it twice."""
import re
import sys
from pathlib import Path

import pytest

from tests.test_seed_examples import _check, _env, run_script

REPO = Path(__file__).resolve().parents[1]
SMALL_DATA = '"data.max_corpus_bytes=300000", "training.eval_batches=1"'
SUBSTITUTIONS = [   # (the docs' text, what the test runs instead): fewer steps, less data
    ('load_profile("tiny", ["training.max_steps=100"])',
     f'load_profile("tiny", ["training.max_steps=2", "training.warmup_steps=1", {SMALL_DATA}])'),
    ('config = load_profile("tiny")', f'config = load_profile("tiny", [{SMALL_DATA}])'),
    ('num_epochs=3', 'num_epochs=1'),
]
STARTED = "README SCRIPT STARTED"


def doc_pages() -> list:
    """The pages whose examples run, in reading order: README.md, then docs/*.md by name
    (docs/_incoming/ holds drafts, not pages)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_blocks() -> dict:
    """{name: code}: the blocks in reading order, named after their section (a page under docs/
    prefixes its file name: ``checkpoints_checkpoints_and_resume``)."""
    blocks = {}
    for page in doc_pages():
        text = page.read_text()
        prefix = "" if page.name == "README.md" else re.sub(r"\W+", "_", page.stem) + "_"
        heading = prefix + "top"
        # Fenced blocks first, so that a "# comment" line in a bash block is not a heading.
        for match in re.finditer(r"^```(\w*)\n(.*?)^```|^(#+ [^\n]*)$", text, re.M | re.S):
            if match.group(3):
                heading = prefix + re.sub(r"\W+", "_",
                                          match.group(3).lstrip("# ")).strip("_").lower()
            elif match.group(1) == "python":
                name, n = heading, 2
                while name in blocks:
                    name, n = f"{heading}_{n}", n + 1
                blocks[name] = match.group(2)
    return blocks


def script_text(blocks: dict) -> str:
    text = f"import sys\nsys.stdout.write('{STARTED}\\n'); sys.stdout.flush()\n"
    for name, code in blocks.items():
        text += f"{code}\nsys.stdout.write('EXAMPLE {name} OK\\n'); sys.stdout.flush()\n"
    for readme, ours in SUBSTITUTIONS:
        assert text.count(readme) == 1, \
            f"README.md and docs/*.md no longer contain {readme!r} once"
        text = text.replace(readme, ours)
    return text


BLOCKS = readme_blocks()
_RESULTS: dict = {}


def _result(tmp_path_factory, name):
    if not _RESULTS:
        root = tmp_path_factory.mktemp("readme")
        _RESULTS.update(run_script(root / "script.py", script_text(BLOCKS), list(BLOCKS),
                                   [sys.executable], _env(root)))
    return _RESULTS[name]


def test_readme_has_the_blocks_this_test_expects():
    assert len(BLOCKS) >= 4, BLOCKS.keys()
    # The front door keeps a runnable example of the main Python flows.
    assert {"pretraining", "fine_tuning_sft_and_lora"} <= set(BLOCKS), BLOCKS.keys()


@pytest.mark.parametrize("name", list(BLOCKS))
def test_readme_python_block_runs_as_a_script(tmp_path_factory, name):
    passed, output = _result(tmp_path_factory, name)
    assert output.count(STARTED) == 1, "a child process re-ran the script as __main__"
    _check((passed, output), name)
