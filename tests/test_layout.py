"""The package's shape (csrc/README.md, mixedprec/ops/__init__.py): modules small enough to read,
no import cycle, and no import from a lower layer to a higher one. Imports are read from the
source (function-level ones too), so the test sees what a lazy import would hide."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mixedprec"
MAX_LINES = 400

# Lowest first: a module may import from its own layer and the ones before it. The root package
# is a facade over nn and ops that only the command line and the demo use.
LAYERS = [
    {"atomic", "_extension"},
    {"formats", "backends"},
    {"ops"},
    {"metrics", "checkpoint", "distributed", "training"},
    {"nn"},
    {"sbs", "opq"},
    {"reporting"},
    {"models", "data"},
    {"", "cli", "demo", "__main__"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("mixedprec",) + path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports (a name imported from a package counts as its
    submodule when there is one of that name)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mixedprec"}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            if source.split(".")[0] == "mixedprec":
                found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    unit = module.split(".")[1] if "." in module else ""
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def test_every_module_is_placed_in_a_layer():
    unplaced = sorted(m for m in MODULES if not any((m.split(".") + [""])[1] in units for units in LAYERS))
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_no_module_is_over_the_line_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_runs_up_the_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if _layer(b) > _layer(a))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(MODULES):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_imports():
    """The graph is read right: known edges are in it (else the tests above would pass on nothing)."""
    assert "mixedprec.ops.backend" in GRAPH["mixedprec.ops.bit_sharing_quant"]
    assert "mixedprec.nn.pack" in GRAPH["mixedprec.sbs.packing"]
    assert _layer("mixedprec.sbs.packing") > _layer("mixedprec.nn.pack")
