"""The module graph of ``indicators/``: no import cycles, and the daemon's layers apart.

Every import counts, also one inside a function (a lazy import is still a
dependency) and one under ``if TYPE_CHECKING:`` (an annotation that needs a
higher module is a dependency too: a protocol or a looser type breaks it).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "indicators"


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                for candidate in (f"{target}.{alias.name}", target):
                    if candidate in modules and candidate != name:
                        found.add(candidate)
                        break

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names if alias.name in modules)

    Visitor().visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_package_of(a: str, b: str) -> bool:
    """A package importing its own child (or the child its package's re-exports)."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start and len(trail) > 1:
                    steps = [*trail, start]
                    if not all(_is_package_of(a, b) for a, b in itertools.pairwise(steps)):
                        cycles.append(" -> ".join(steps))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles, cycles


def test_the_commands_and_the_service_do_not_import_each_other() -> None:
    graph = _graph()
    assert "indicators.daemon.service" not in graph["indicators.daemon.commands"]
    assert "indicators.daemon.commands" in graph["indicators.daemon.service"]
