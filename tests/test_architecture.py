"""The import graph of csa/ against the layers declared in docs/make_architecture.py: no circle, no upward
import, only the declared wing-to-wing imports; and docs/ARCHITECTURE.md generated from the code."""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC_FILE = REPO / "docs" / "make_architecture.py"


def load_spec():
    spec = importlib.util.spec_from_file_location("make_architecture", SPEC_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPEC = load_spec()


def package_modules() -> dict[str, Path]:
    """Every module of csa/ by dotted name (a package by its own name, for its ``__init__.py``)."""
    modules = {}
    for path in sorted((REPO / "csa").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(node: ast.AST, package: str) -> list[str]:
    """Dotted names an import statement may bring in (``from a import b`` gives ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: climb from the importing module's package
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """Module -> the csa modules it imports anywhere in its file (module level, functions, methods)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            graph[name].update(t for t in imported_names(node, package) if t in modules and t != name)
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up a layer, or from one wing into another without a declared reason."""
    bad = []
    for importer, targets in sorted(graph.items()):
        low, wing = SPEC.layer_of(importer)
        for target in sorted(targets):
            target_low, target_wing = SPEC.layer_of(target)
            if target_low < low:
                bad.append(f"{importer} -> {target} (upward: {SPEC.LAYERS[low][0]} -> {SPEC.LAYERS[target_low][0]})")
            elif wing != target_wing and wing in SPEC.WINGS and target_wing in SPEC.WINGS \
                    and (wing, target_wing) not in SPEC.WING_EDGES:
                bad.append(f"{importer} -> {target} (wing {wing} -> {target_wing} is not in WING_EDGES)")
    return bad


def test_every_module_belongs_to_a_layer():
    missing = []
    for name in package_modules():
        try:
            SPEC.layer_of(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"add these modules to LAYERS in docs/make_architecture.py: {missing}"


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    # module level, inside a function, and a package's __init__
    assert "csa.compare.inputs" in graph["csa.compare.chain"]
    assert "csa.training.curves" in graph["csa.training.run_folder"]  # imported inside write_history
    assert "csa.fileio" in graph["csa.notebook"]
    assert len(graph) == len(package_modules()) > 50


def test_no_import_circle():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_imports_only_go_down_and_between_wings_only_as_declared():
    bad = forbidden_edges(import_graph())
    assert not bad, "imports against docs/make_architecture.py LAYERS / WING_EDGES:\n" + "\n".join(bad)


def test_every_declared_wing_edge_is_used():
    """A reason listed for an import that no longer exists is stale: remove it from WING_EDGES."""
    used = {(SPEC.layer_of(a)[1], SPEC.layer_of(b)[1]) for a, targets in import_graph().items() for b in targets}
    stale = [edge for edge in SPEC.WING_EDGES if edge not in used]
    assert not stale, f"WING_EDGES lists imports that do not exist: {stale}"


@pytest.mark.parametrize("graph, expected", [
    ({"csa.search": {"csa.affinity"}, "csa.affinity": {"csa.search"}}, "circle"),
    ({"csa.compare.chain": {"csa.compare.expansion"}, "csa.compare.expansion": {"csa.compare.inputs"},
      "csa.compare.inputs": {"csa.compare.chain"}}, "circle"),
    ({"csa.search": {"csa.rerank"}}, "upward"),
    ({"csa.model": {"csa.training.engine"}}, "upward"),
    ({"csa.data.layout": {"csa.training.config"}}, "WING_EDGES"),
    ({"csa.notebook.figures": {"csa.compare.runner"}}, "WING_EDGES"),
    ({"csa.training.train": {"csa.data.layout", "csa.model"}, "csa.cli": {"csa.training.train"}}, None),
    ({"csa.training.__main__": {"csa.cli"}}, None),                  # an entry point is in the command-line layer
    ({"csa.training.command": {"csa.cli_errors"}}, "upward"),         # the rest of its wing is not
    ({"csa.experiments.pooled": {"csa.training.train", "csa.compare.tuning"}}, None),
    ({"csa.training.release": {"csa.experiments.held_out"}}, "WING_EDGES"),
])
def test_the_checks_catch_circles_upward_and_undeclared_imports(graph, expected):
    circle = find_circle(graph)
    bad = forbidden_edges(graph)
    if expected == "circle":
        assert circle is not None and circle[0] == circle[-1] and len(circle) == len(graph) + 1
    elif expected is None:
        assert circle is None and not bad
    else:
        assert circle is None and len(bad) == 1 and expected in bad[0]


def test_architecture_doc_is_generated_from_the_code():
    out = subprocess.run([sys.executable, str(SPEC_FILE), "--check"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for module in package_modules():
        if module.count(".") and not module.endswith("__main__") and module not in SPEC.WINGS:
            assert f"`{module.split('.', 1)[1].replace('.', '/')}.py`" in text, f"{module} missing from the tables"


#: Longest function body (lines, docstring included) the package allows without a stated reason.
MAX_FUNCTION_LINES = 65


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of the functions in ``source`` longer than ``limit`` whose docstring gives no reason."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit and "long because" not in (ast.get_docstring(node) or "").lower():
                found.append((node.name, lines))
    return found


def test_long_functions_are_found_unless_their_docstring_says_why():
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    assert long_functions(f"def f():\n{body}\n") == [("f", 71)]
    assert long_functions(f'def f():\n    """Long because it is a table."""\n{body}\n') == []
    assert long_functions("def g():\n    return 1\n") == []


def test_no_function_in_the_package_is_longer_than_about_sixty_lines():
    found = {f"{path.relative_to(REPO)}:{name}": lines for path in sorted((REPO / "csa").rglob("*.py"))
             for name, lines in long_functions(path.read_text(encoding="utf-8"))}
    assert not found, f"split these functions or say in their docstring why they are long: {found}"
