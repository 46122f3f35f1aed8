"""The package's import graph has no circle. Every import of an opensora_vae module counts, at module level or inside
a function alike (a function-local import only hides a circle until the function runs), so the direction of
docs/design.md holds: models know nothing of data, training, configs or metrics; metrics know no models; config
knows the registries and models only to check them; the jobs and the trainer compose."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

PACKAGE = Path(__file__).resolve().parents[1] / "opensora_vae"


def module_names(root: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (a package's own name is its __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The module an imported dotted name is: itself, or the nearest enclosing module (an attribute's)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package modules `module` imports anywhere in its file (module level, functions, classes, `if` blocks)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from X import name`: the submodule X.name where there is one, else X itself
            names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                     for alias in node.names]
        else:
            continue
        out.update(m for m in (_resolve(n, modules) for n in names) if m is not None and m != module)
    return out


def import_graph(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import circle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_direction_of_the_layers():
    """models/ imports none of data, training, configs, jobs or metrics; metrics/ imports no model."""
    graph = import_graph()
    above_models = ("opensora_vae.data", "opensora_vae.train", "opensora_vae.config", "opensora_vae.metrics",
                    "opensora_vae.jobs", "opensora_vae.inference", "opensora_vae.encode", "opensora_vae.protocol",
                    "opensora_vae.losses", "opensora_vae.adversarial", "opensora_vae.provenance")
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   if (m.startswith("opensora_vae.models") and t.startswith(above_models))
                   or (m.startswith("opensora_vae.metrics") and t.startswith("opensora_vae.models")))
    assert not wrong, "imports against the direction of docs/design.md: " + "; ".join(wrong)
    for leaf in ("opensora_vae.schema", "opensora_vae.errors", "opensora_vae.registry"):
        assert not graph[leaf], f"{leaf} is a leaf but imports {sorted(graph[leaf])}"


def test_a_planted_circle_is_found_and_named(tmp_path):
    """The check can fail: a copy of two modules importing each other (one inside a function) is a circle."""
    pkg = tmp_path / "opensora_vae"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("from .build import make\n")
    (pkg / "models" / "build.py").write_text("from ..registry import MODELS\n\ndef make():\n    return MODELS\n")
    (pkg / "config.py").write_text("from .models import make  # the package's attribute: models/__init__.py\n")
    (pkg / "registry.py").write_text("MODELS = {}\n\ndef check():\n    from .config import make  # hidden\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"opensora_vae.config", "opensora_vae.models", "opensora_vae.models.build",
                          "opensora_vae.registry"}, cycle
    (pkg / "registry.py").write_text("MODELS = {}\n")
    assert find_cycle(import_graph(pkg)) is None
