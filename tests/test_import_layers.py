"""The import map of `apt/`: no circles, and every arrow points down the declared layers.

Read with `ast` only (nothing of the package is imported; the files are parsed once, in about a
second): every file under apt/ is a node, every `import` / `from ... import` an arrow, including
the ones inside functions (a lazy import is still a dependency, it only hides the circle until
run time). Relative imports are resolved against the importing file.
`python tests/test_import_layers.py` prints the map.
"""
import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "apt"

# The floors, lowest first. A module belongs to the longest unit whose name prefixes it. An
# arrow may point into a unit on a lower floor or into its own unit; on the same floor only
# along SIDEWAYS below. Anything else points up, and is reported.
LAYERS = [
    ["apt.kernels"],                      # pure compute; imports nothing of ours
    ["apt.core"],                         # config, exit codes, logging, CPU compatibility
    # data, bottom-up: its errors, tokenizers, sources, datasets, loading, build.py on top
    ["apt.trainops.data.errors"],
    ["apt.trainops.data.tokenizers"],
    ["apt.trainops.data.sources"],
    ["apt.trainops.data.datasets"],
    ["apt.trainops.data.loading"],
    ["apt.trainops.data"],
    ["apt.trainops.runtime"],             # launcher env, process groups, seeds: APTModel() starts them
    ["apt.trainops.checkpoints"],         # dist_checkpointing I/O; builds no model
    ["apt.trainops.interop"],             # HF import/export, from_pretrained: the model class
    #                                       comes from the caller (APTModel passes itself)
    ["apt.model"],                        # architectures, LoRA, Megatron specs
    # trainops' services, bottom-up; each imports only what sits under it
    ["apt.trainops.distributed"],         # plan, memory, DDP wrapper (re-exports the runtime)
    ["apt.trainops.reliability"],         # preflight, doctor, lifetime, watchdog, faults, anomaly,
    #                                       run control: over the runtime and checkpoints, under the engines
    ["apt.trainops.perf"],                # the performance model over the plan
    ["apt.trainops.callbacks"],           # the loop's hook protocol, implemented above
    ["apt.trainops.artifacts"],
    ["apt.trainops.rewards"],
    ["apt.trainops.objectives"],
    ["apt.trainops.distributed.engines"],  # ZeRO / Megatron engines: take an objective;
    #                                      their forward-only schedule serves the Evaluator
    ["apt.trainops.eval"],
    ["apt.trainops.monitoring"],          # MFU from eval/flops.py
    ["apt.trainops.rl"],
    ["apt.trainops.trainers"],            # the trainers: the one loop and its variants
    ["apt.trainops.engine"],              # the seed's import path for the trainers
    ["apt.cli"],
    ["apt.__main__"],
]
SIDEWAYS = set()   # (unit, unit) pairs allowed on one floor; none needed today
# The package files that only name their package (empty `__init__` of apt and apt.trainops)
# sit on no floor; an arrow from or into them would be reported as unplaced.
UNPLACED_OK = {"apt", "apt.trainops"}

# Known offenders, as (importer, imported) module pairs, left out of all three checks. Each is
# owned by a fix on another branch of issue 28, or named as not yet owned; the integrator
# deletes an entry when its fix is merged (test_known_offenders_still_exist insists on that
# once the arrow is gone), and the test then guards the fix. Do not add to this list: fix
# the import, or move the imported thing down.
KNOWN_OFFENDERS = set()   # empty: every arrow of apt/ points down


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def all_modules():
    """{module name: (path, is_package)} for every .py under apt/."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found[module_name(path)] = (path, path.name == "__init__.py")
    return found


def _nearest_module(name, modules):
    """The deepest module of ours that `name` (a dotted path, maybe ending in an attribute)
    lives in, or None when it is not ours."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module, path, is_package, modules):
    """The set of our modules that `module` imports anywhere in its text."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.add(_nearest_module(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # `from pkg import submodule` is an arrow into the submodule itself
                targets.add(_nearest_module(f"{source}.{alias.name}", modules))
    targets.discard(None)
    targets.discard(module)
    return targets


@functools.lru_cache(maxsize=None)
def import_graph():
    """{module: frozenset of the modules it imports}, parsed once per test session."""
    modules = all_modules()
    return {name: frozenset(imports_of(name, path, is_pkg, modules))
            for name, (path, is_pkg) in modules.items()}


def unit_of(module):
    """The layer unit (a package, or a top-level file such as apt.cli) a module belongs to."""
    best = None
    for floor in LAYERS:
        for unit in floor:
            if (module == unit or module.startswith(unit + ".")) and (
                    best is None or len(unit) > len(best)):
                best = unit
    return best


def floor_of(unit):
    return next(i for i, floor in enumerate(LAYERS) if unit in floor)


def cycles(graph):
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _without_known(graph):
    return {src: {dst for dst in dsts if (src, dst) not in KNOWN_OFFENDERS}
            for src, dsts in graph.items()}


def _arrows_within(graph, members):
    return sorted(f"  {src} -> {dst}" for src in members for dst in graph[src] if dst in members)


def unit_graph(graph, unit=None):
    """{unit: {unit: [the module arrows behind it]}} between different units (layer units by
    default)."""
    unit = unit or unit_of
    units = {}
    for src, dsts in graph.items():
        units.setdefault(unit(src), {})
        for dst in dsts:
            a, b = unit(src), unit(dst)
            if a and b and a != b:
                units[a].setdefault(b, []).append(f"{src} -> {dst}")
    return units


def folder_of(module):
    """The package (folder) a module file sits in; a package's __init__ sits in itself. A file
    directly in apt/ or apt/trainops/ (cli.py, callbacks.py, ...) is a room of its own: those
    two folders only hold the others."""
    _, is_package = all_modules()[module]
    folder = module if is_package else module.rpartition(".")[0]
    return module if folder in UNPLACED_OK and not is_package else folder


def _nested(a, b):
    return a.startswith(b + ".") or b.startswith(a + ".")


def folder_graph(graph):
    """Arrows between folders. Those between a package and its own subpackages are left to
    the layer check: a package's __init__ re-exports its children, and the children share the
    package's base module (data/errors.py); LAYERS orders them."""
    folders = unit_graph(graph, folder_of)
    return {a: {b: arrows for b, arrows in dsts.items() if not _nested(a, b)}
            for a, dsts in folders.items()}


def _shortest_cycle(edges, start):
    """The shortest path start -> ... -> start, as a list of nodes (breadth-first)."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(edges.get(path[-1], ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return None


def test_every_module_is_on_a_floor():
    graph = import_graph()
    unplaced = sorted(m for m in graph if unit_of(m) is None and m not in UNPLACED_OK)
    assert not unplaced, ("modules on no floor of LAYERS in tests/test_import_layers.py "
                          "(add their package to a floor): " + ", ".join(unplaced))


def test_no_import_cycles_between_modules():
    graph = _without_known(import_graph())
    found = cycles(graph)
    report = "\n".join(f"cycle {i + 1}: {' , '.join(c)}\n"
                       + "\n".join(_arrows_within(graph, set(c)))
                       for i, c in enumerate(found))
    assert not found, f"{len(found)} import cycle(s) between modules:\n{report}"


def test_no_import_cycles_between_packages():
    folders = folder_graph(_without_known(import_graph()))
    found = cycles({a: set(dsts) for a, dsts in folders.items()})
    lines = []
    for i, members in enumerate(found):
        lines.append(f"cycle {i + 1} joins {len(members)} packages: {', '.join(members)}")
        edges = {a: {b for b in folders[a] if b in members} for a in members}
        shown = set()
        for start in members:      # each package's shortest way back to itself
            path = _shortest_cycle(edges, start)
            key = frozenset(zip(path, path[1:]))
            if key in shown:
                continue
            shown.add(key)
            lines.append("  " + " -> ".join(path))
            for a, b in zip(path, path[1:]):
                arrows = sorted(folders[a][b])
                more = f" (+{len(arrows) - 1} more)" if len(arrows) > 1 else ""
                lines.append(f"      {arrows[0]}{more}")
    assert not found, f"{len(found)} import cycle(s) between packages:\n" + "\n".join(lines)


def upward_arrows(graph):
    bad = []
    for a, dsts in unit_graph(graph).items():
        for b, arrows in dsts.items():
            if a is None or b is None:
                continue
            fa, fb = floor_of(a), floor_of(b)
            if fb < fa or (fa == fb and (a, b) in SIDEWAYS):
                continue
            where = "up" if fb > fa else "sideways"
            bad.extend(f"  {arrow}   ({a} floor {fa} -> {b} floor {fb}, {where})"
                       for arrow in sorted(arrows))
    return sorted(bad)


def test_arrows_point_down_the_layers():
    bad = upward_arrows(_without_known(import_graph()))
    assert not bad, (f"{len(bad)} import(s) point up or sideways against LAYERS in "
                     "tests/test_import_layers.py (move the imported thing down, or the "
                     "importer up):\n" + "\n".join(bad))


def test_known_offenders_still_exist():
    """An allow-list entry whose arrow is gone must be deleted, so the list cannot rot."""
    graph = import_graph()
    stale = sorted(f"{a} -> {b}" for a, b in KNOWN_OFFENDERS if b not in graph.get(a, ()))
    assert not stale, "KNOWN_OFFENDERS entries no longer in the code (delete them): " + \
        ", ".join(stale)


if __name__ == "__main__":
    graph = import_graph()
    for unit, dsts in sorted(unit_graph(graph).items(), key=lambda kv: str(kv[0])):
        print(f"{unit}  -> {', '.join(sorted(dsts)) or '-'}")
    folders = folder_graph(graph)
    print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} arrows between them; "
          f"{len(folders)} packages, {sum(map(len, folders.values()))} arrows between them")
    print("module cycles (allow-listed arrows included):", cycles(graph))
    print("package cycles (the same):", cycles({a: set(d) for a, d in folders.items()}))
    print("against the layers (the same):", *upward_arrows(graph), sep="\n")
