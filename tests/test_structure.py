"""The package's shape: folders by job, imports that only go down, no import loops, a docstring on
every module and a stated surface on every package. Imports are read from the source (module level,
inside functions and under TYPE_CHECKING alike), so a lazy import that closes a loop is caught too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "m3lab"

# From the bottom up: a module may import from its own layer (without a loop) or from a layer below.
LAYERS = [
    ("foundation", {"m3lab.errors", "m3lab.io", "m3lab.compat", "m3lab.gpus", "m3lab.tensors"}),
    ("the learner's data", {"m3lab.data"}),
    ("the run's description", {"m3lab.standin", "m3lab.deepspeed_json", "m3lab.config", "m3lab.command"}),
    ("real training", {"m3lab.train"}),
    ("the predictor", {"m3lab.predict"}),
    ("what to run", {"m3lab.plan"}),
    ("checking the figures, using the model", {"m3lab.evidence", "m3lab.use"}),
    ("the lessons", {"m3lab.lessons"}),
    ("front doors", {"m3lab.cli", "m3lab.__main__", "m3lab.run_m3"}),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The m3lab modules ``name`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [t for t in submodules if t in MODULES]
            if len(targets) < len(submodules):  # a name from the module itself, not a submodule of it
                targets.append(node.module)
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target not in (name, "m3lab"):
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer of tests/test_structure.py: give it the folder of its job")


def _loops() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return loops


def test_the_import_walk_sees_lazy_imports():
    """The walk reads imports inside functions too (the runner imports the meter inside main)."""
    assert "m3lab.train.meter" in GRAPH["m3lab.train.runner"]
    assert "m3lab.predict.steptime" in GRAPH["m3lab.predict.report"]


def test_no_import_loops():
    assert _loops() == []


def test_a_loop_would_be_found(monkeypatch):
    monkeypatch.setitem(GRAPH, "m3lab.errors", GRAPH["m3lab.errors"] | {"m3lab.config"})
    assert ["m3lab.config", "m3lab.deepspeed_json", "m3lab.errors"] in _loops()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_go_down(name):
    upward = sorted(target for target in GRAPH[name] if _layer(target) > _layer(name))
    assert not upward, (f"{name} ({LAYERS[_layer(name)][0]}) imports {upward} from a layer above it; move the "
                        "shared piece down to the layer both use")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_owns(name):
    assert ast.get_docstring(ast.parse(MODULES[name].read_text())), f"{MODULES[name]} has no docstring"


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items() if p.name == "__init__.py" and n != "m3lab"))
def test_every_package_states_its_surface(name):
    tree = ast.parse(MODULES[name].read_text())
    assigned = {target.id for node in tree.body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    assert "__all__" in assigned, f"{MODULES[name]} states no __all__"
