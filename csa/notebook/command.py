"""``csa batch``: run a notebook over a parameter grid with papermill (:mod:`csa.notebook.batch`) from the
command line."""
from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``batch`` to the sub-commands of ``csa``."""
    parser = subparsers.add_parser(
        "batch", help="run a notebook over a parameter grid with papermill; see: csa batch --help",
        description="Run a notebook over a Cartesian grid of parameters with papermill; one CSV of results.",
    )
    parser.add_argument("notebook", help="the .ipynb to run (needs a 'parameters' cell defining results_csv)")
    parser.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="grid parameters, each with comma-separated values")
    parser.add_argument("--param", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="fixed parameters for every run")
    parser.add_argument("--out", required=True, help="output folder (notebooks, runs/, results.csv)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    parser.add_argument("--max-workers", type=int, default=1, help="runs executed at the same time (default 1)")
    parser.add_argument("--cwd", default=None,
                        help="working directory of the runs (default: the notebook's folder, as in Jupyter)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true",
                        help="run every point again, even those whose notebook already finished")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the grid; exit status 0 when every run finished, 1 when some failed (each named on stderr)."""
    from csa.notebook.batch import parse_grid, parse_params, run_grid

    result = run_grid(args.notebook, parse_grid(args.grid), args.out, params=parse_params(args.param),
                      kernel=args.kernel, max_workers=args.max_workers, cwd=args.cwd,
                      progress=not args.no_progress, force=args.force)
    n_runs = len(result.notebooks)
    done = f", {len(result.skipped)} already finished (skipped; --force runs them again)" if result.skipped else ""
    print(f"[csa batch] {n_runs - len(result.failures)}/{n_runs} runs ok{done}, {len(result.table)} rows -> "
          f"{result.results_csv}")
    if result.failures:
        print(f"[csa batch] {len(result.failures)} run(s) failed:", file=sys.stderr)
        for name, error in result.failures:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0
