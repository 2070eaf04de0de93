"""Write the generated parts of docs/ARCHITECTURE.md from the code (run: python docs/make_architecture.py).

The layers of the package and the imports allowed between its wings are declared once, here
(:data:`LAYERS`, :data:`WING_EDGES`); ``tests/test_architecture.py`` checks every import of ``csa/``
against them.  The module tables are read from the code itself: each module's docstring (its first
sentence) and its ``__all__``.  Only the text between ``<!-- generated:NAME -->`` and
``<!-- end generated:NAME -->`` is rewritten; ``--check`` exits 1 when that text differs from what the
code gives, writing nothing (the tests run it).
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "csa"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

#: Layers from the top down: a module may import its own layer or a lower one, never a higher one.
#: Top-level modules are named one by one; a wing (sub-package) is one entry for all its modules, except the
#: entry points named on their own (``python -m csa.training`` is ``csa train``: it calls the command line).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("command line and the package's front names",
     ("csa", "csa.__main__", "csa.cli", "csa.cli_errors", "csa.training.__main__")),
    ("the wings",
     ("csa.notebook", "csa.experiments", "csa.compare", "csa.training", "csa.descriptors", "csa.data")),
    ("the paper, built on",
     ("csa.rerank", "csa.checkpoint", "csa.largescale")),
    ("the paper's parts",
     ("csa.model", "csa.cpu_kernels", "csa.losses", "csa.affinity", "csa.search", "csa.evaluate", "csa.stats")),
    ("inputs, files, devices",
     ("csa.validation", "csa.arrays", "csa.fileio", "csa.device", "csa.progress")),
]
WINGS = LAYERS[1][1]

#: The imports allowed from one wing into another (importer, imported): why each exists.
WING_EDGES: dict[tuple[str, str], str] = {
    ("csa.descriptors", "csa.data"): "extraction reads images and writes descriptor files in the data layout",
    ("csa.training", "csa.data"): "training reads the trainset's descriptors and clusters",
    ("csa.experiments", "csa.training"): "the experiments train models (recipe selection, seed sweeps, learning "
                                         "curves, the paper table) and release them",
    ("csa.experiments", "csa.compare"): "the experiments score held-out benchmarks with the comparison runner and "
                                        "the untrained re-rankers",
    ("csa.experiments", "csa.descriptors"): "the paper-table experiments learn whitenings and read the compact "
                                            "descriptor copies; `csa demo extract` extracts the demo's descriptors",
    ("csa.experiments", "csa.data"): "the experiments read the demo's cities, ground truth and trainsets",
    ("csa.compare", "csa.data"): "the comparison of a benchmark loads its ground truth and descriptors",
    ("csa.notebook", "csa.training"): "notebook 2's parameters are checked as `csa train` checks its flags",
    ("csa.notebook", "csa.data"): "notebook parameters naming a trainset are checked against the data layout",
}


def module_name(path: Path) -> str:
    """``csa/compare/chain.py`` -> ``csa.compare.chain``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> tuple[int, str]:
    """(index in :data:`LAYERS`, entry) of a module: its wing, or its own name for the top level."""
    parts = module.split(".")
    named = any(module in members for _, members in LAYERS)
    entry = ".".join(parts[:2]) if not named and len(parts) > 1 and ".".join(parts[:2]) in WINGS else module
    for index, (_, members) in enumerate(LAYERS):
        if entry in members:
            return index, entry
    raise KeyError(f"{module} is in no layer of docs/make_architecture.py LAYERS; add it there")


def _summary(tree: ast.Module) -> str:
    """The docstring's first sentence on one line, reStructuredText roles as Markdown code."""
    doc = ast.get_docstring(tree) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z(`*])", paragraph, maxsplit=1)[0]
    sentence = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", sentence).replace("``", "`")
    return sentence.replace("|", "\\|")


def _public_names(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [elt.value for elt in node.value.elts if isinstance(elt, ast.Constant)]
    return []


def _module_rows(paths: list[Path]) -> list[str]:
    rows = ["| module | what it holds | public names (`__all__`) |", "|---|---|---|"]
    for path in paths:
        tree = ast.parse(path.read_text())
        names = ", ".join(f"`{n}`" for n in _public_names(tree)) or "—"
        rows.append(f"| `{path.relative_to(PACKAGE).as_posix()}` | {_summary(tree)} | {names} |")
    return rows


def layers_section() -> str:
    rows = [("  ".join(members), title) for title, members in LAYERS]
    width = max(len(names) for names, _ in rows) + 4
    lines = ["```"] + [f"{names:<{width}}{title}" for names, title in rows] + ["```"]
    lines.append("Imports only go down this list (a module may import its own layer).  Between wings, only these "
                 "imports exist, each for a reason:")
    lines.extend(f"- `{a}` → `{b}`: {why}" for (a, b), why in WING_EDGES.items())
    lines.append("`tests/test_architecture.py` checks every import of `csa/` (inside functions too) against this: "
                 "no circle, no upward import, no other wing-to-wing import.")
    return "\n".join(lines)


def top_level_section() -> str:
    paths = sorted(p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    return "\n".join(_module_rows(paths))


def wings_section() -> str:
    lines = []
    for wing in WINGS:
        folder = PACKAGE / wing.split(".")[1]
        tree = ast.parse((folder / "__init__.py").read_text())
        lines.append(f"### `{wing}`\n{_summary(tree)}\n")
        paths = sorted(p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
        lines.extend(_module_rows(paths))
        lines.append("")
    return "\n".join(lines).rstrip()


SECTIONS = {"layers": layers_section, "top-level": top_level_section, "wings": wings_section}


def render(text: str) -> str:
    """``text`` with every generated section replaced by what the code gives now."""
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- end generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{ARCHITECTURE}: no <!-- generated:{name} --> ... <!-- end generated:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    args = parser.parse_args(argv)
    current = ARCHITECTURE.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"out of date: {ARCHITECTURE}; run python docs/make_architecture.py", file=sys.stderr)
            return 1
        return 0
    from csa.fileio import atomic_write

    with atomic_write(ARCHITECTURE, "w") as f:
        f.write(wanted)
    print(f"wrote {ARCHITECTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
