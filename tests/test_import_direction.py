"""The model definition sits below checkpoint I/O, and loading saved weights into a model
(apt/trainops/interop) sits above both (issue 28: the model/ <-> checkpoints/ circle). Read from
the source, every import counted, the ones inside functions too."""
import ast
from pathlib import Path

APT = Path(__file__).resolve().parents[1] / "apt"


def _imports(folder: str) -> dict[str, set[str]]:
    """Each module under ``apt/<folder>`` -> the absolute names it imports."""
    found = {}
    for path in sorted((APT / folder).rglob("*.py")):
        package = ".".join(("apt",) + path.relative_to(APT).parent.parts)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = (f"{base}.{node.module}" if node.module else base) if node.level \
                    else node.module
                names.add(module)
        found[str(path.relative_to(APT))] = names
    return found


def _importing(folder: str, prefix: str) -> dict[str, list[str]]:
    return {module: sorted(n for n in names if n == prefix or n.startswith(prefix + "."))
            for module, names in _imports(folder).items()
            if any(n == prefix or n.startswith(prefix + ".") for n in names)}


def test_checkpoint_io_never_imports_the_model_nor_the_loaders():
    assert _importing("trainops/checkpoints", "apt.model") == {}
    assert _importing("trainops/checkpoints", "apt.trainops.interop") == {}


def test_the_model_imports_no_checkpoint_io_and_only_from_pretrained_reaches_up():
    assert _importing("model", "apt.trainops.checkpoints") == {}
    # The seed API keeps from_pretrained on the class: its call-time import is the one arrow up.
    assert _importing("model", "apt.trainops.interop") == {
        "model/architectures.py": ["apt.trainops.interop.pretrained"]}
