"""The package's modules import each other without a cycle, counting imports inside functions too (a cycle
hidden in a function still ties two modules together)."""
import ast

from conftest import ROOT

PACKAGE = ROOT / "tfrewrite"


def _module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (an imported name that is itself a module counts as that module)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    found.add(f"{source}.{alias.name}")
                elif source in modules:
                    found.add(source)
    found.discard(here)
    return found


def test_no_import_cycle_inside_the_package():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    assert graph["tfrewrite.rewrite"] >= {"tfrewrite.plan", "tfrewrite.io"}  # the scan sees relative imports
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_passes_hold_rewrites_only():
    """The budget is a planner beside plan.py; the passes never import the planner or the main job."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    for path in (PACKAGE / "passes").glob("*.py"):
        assert not _imports(path, modules) & {"tfrewrite.budget", "tfrewrite.rewrite", "tfrewrite.plan"}, path
