"""The package's layers (docs/architecture.md): no cycles, no upward or private imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import badnet_repair as br

PACKAGE = Path(br.__file__).parent

# docs/architecture.md's table; a module may import its own layer and the layers below.
LAYERS = [
    {"errors", "defaults", "metrics", "progress", "_backend", "formats"},
    {"nets"},
    {"defenses", "detectors", "attacks", "demo"},
    {"reporting"},
    {"workflow"},
    {"cli", "__main__", ""},
]

def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every relative import in the file, lazy ones included."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((target, [a.name for a in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for target, names in _imports(m, p):
            for n in names:
                sub = f"{target}.{n}".lstrip(".")
                if sub in mods:  # from . import submodule
                    graph[m].add(sub)
                elif not n.startswith("__") and target in mods and target != m:  # a name from a module
                    graph[m].add(target)
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module!r} is in no layer of docs/architecture.md")


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            assert state.get(t) != 1, f"import cycle: {' -> '.join([*path, m, t])}"
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_sub_packages_show_the_layers():
    mods = _modules()
    packages = {m for m in mods if "." not in m and mods[m].name == "__init__.py" and m}
    assert packages == {"formats", "nets", "defenses", "detectors", "attacks", "demo", "reporting", "workflow"}
    loose = {m for m in mods if "." not in m} - packages
    assert loose == {"", "__main__", "_backend", "cli", "defaults", "errors", "metrics", "progress"}, loose


def test_lower_layers_never_import_upper_ones():
    wrong = [f"{m} imports {t}" for m, ts in _graph().items() for t in ts
             if m.split(".")[0] != t.split(".")[0] and _layer(t) > _layer(m)]
    assert not wrong, wrong


def test_no_private_names_across_modules_and_no_stdlib_names():
    mods = _modules()
    private = [f"{m}: from {t} import {n}" for m, p in mods.items() for t, names in _imports(m, p)
               for n in names if n.startswith("_") and not n.startswith("__") and f"{t}.{n}".lstrip(".") not in mods]
    assert not private, private
    shadowing = [m for m in mods if m.split(".")[-1] in sys.stdlib_module_names]
    assert not shadowing, shadowing


def test_the_documented_api_is_reachable():
    for name in br.__all__:
        assert hasattr(br, name), name
    assert callable(br.attacks.train_badnet) and callable(br.faces.make_faces) and br.faces is br.demo.faces
    assert callable(br.triggers.drawn_sunglasses) and callable(br.demo.make_demo)
    assert set(br.defenses.REGISTRY) >= {"pruning", "fine-tuning", "fine-pruning"}
    assert "disagreement" in br.detectors.REGISTRY
