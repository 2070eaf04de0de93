"""Run one notebook over a grid of parameters with papermill and collect the result tables in one CSV.

Usage::

    csa batch notebooks/03_reranking.ipynb --grid topk=128,256 anchor_len=64,128 \\
        --param dataset=roxford5k-mini --out runs/grid [--kernel python3] [--max-workers 1]

Convention: the notebook has a cell tagged ``parameters`` that defines ``results_csv`` (and every
name given with ``--grid``/``--param``), and writes its result table to the path ``results_csv``.
For each point of the Cartesian grid the batch runner executes the notebook into
``DIR/<notebook>__<key>-<value>_....ipynb`` with a per-run ``results_csv`` under ``DIR/runs/``,
reads that table back, prepends the grid values as columns and writes all rows so far to
``DIR/results.csv`` (atomically, after every run).  A failing run is reported with its name and
error (its notebook is kept as ``<run>.failed.ipynb``), the other runs go on, and the command
exits with status 1 at the end.

Resume: a run executes into hidden temporary files (``.<run>.running.ipynb`` and its CSV); only a
run that finished is moved to its final names, CSV first, then notebook.  So a final notebook
always means a finished run, and running the same command again skips the runs whose notebook
finished with the same parameters (``--force`` runs them again); temporaries left by a killed
batch are removed when the next one starts.  ``results.csv`` is rebuilt from every finished run of
the grid.  Ctrl-C stops the batch cleanly: the finished runs stay, ``results.csv`` lists them.
``DIR/batch.json`` records the notebook, the grid keys and the sha256 of every finished run's table: a
folder holding another grid's runs is refused (its ``results.csv`` would be replaced), and a table
edited after its run finished is detected and its run executed again.

Values are Python literals (``ast.literal_eval``: ``128``, ``0.5``, ``True``, ``None``, ``'x'``);
anything that is not a literal is kept as a string.  Grid values are separated by commas, so a
grid value cannot itself contain a comma.
"""
from __future__ import annotations

import ast
import contextlib
import itertools
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from csa.fileio import atomic_write, check_output_dir, remove_stale_temporaries, save_table, sha256_file
from csa.progress import progress_bar
from csa.validation import CSAInputError

__all__ = ["parse_value", "parse_grid", "parse_params", "run_name", "check_parameters", "BatchResult", "run_grid"]

RESULTS_PARAMETER = "results_csv"


def parse_value(text: str) -> Any:
    """A Python literal if ``text`` is one (``'128'`` -> 128, ``'None'`` -> None), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _split_assignment(spec: str, flag: str) -> tuple[str, str]:
    key, sep, value = spec.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier() or value == "":
        raise CSAInputError(f"{flag} expects key=value with a Python identifier as key, got {spec!r}")
    return key, value


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``['topk=128,256', 'anchor_len=64']`` -> ``{'topk': [128, 256], 'anchor_len': [64]}`` (order kept)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, values = _split_assignment(spec, "--grid")
        if key in grid:
            raise CSAInputError(f"--grid names {key!r} twice: give all its values once, e.g. {key}=1,2,3")
        parsed = [parse_value(v.strip()) for v in values.split(",")]
        if any(v == "" for v in parsed):
            raise CSAInputError(f"--grid {spec!r} has an empty value: remove the stray comma")
        grid[key] = parsed
    return grid


def parse_params(specs: Sequence[str]) -> dict[str, Any]:
    """``['dataset=roxford5k-mini', 'epochs=3']`` -> ``{'dataset': 'roxford5k-mini', 'epochs': 3}``."""
    params: dict[str, Any] = {}
    for spec in specs:
        key, value = _split_assignment(spec, "--param")
        if key in params:
            raise CSAInputError(f"--param sets {key!r} twice: keep one")
        params[key] = parse_value(value)
    return params


def run_name(notebook: str | Path, point: dict[str, Any]) -> str:
    """File-name-safe name of one run: ``<stem>__key-value_key-value`` (characters outside [A-Za-z0-9._-] -> '-')."""
    parts = [f"{key}-{value}" for key, value in point.items()]
    safe = [re.sub(r"[^A-Za-z0-9._\-]+", "-", p).strip("-") for p in parts]
    return Path(notebook).stem + ("__" + "_".join(safe) if safe else "")


def check_parameters(notebook: str | Path, names: Sequence[str], kernel: str = "python3") -> dict[str, Any]:
    """Fail fast unless the notebook's ``parameters`` cell defines every name in ``names`` and ``results_csv``.

    Returns papermill's description of the notebook's parameters (``papermill.inspect_notebook``).
    A notebook without kernel metadata is inspected as if it ran on ``kernel``.
    """
    import nbformat
    import papermill

    try:
        nb = nbformat.read(str(notebook), as_version=4)
    except Exception as exc:  # not JSON, not a notebook, unreadable
        raise CSAInputError(f"{notebook} is not a readable Jupyter notebook ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else 'no details'}); "
                            f"pass an .ipynb file") from exc
    if nb.metadata.get("kernelspec", {}).get("name"):
        declared = papermill.inspect_notebook(str(notebook))
    else:
        nb.metadata["kernelspec"] = {"name": kernel, "language": "python", "display_name": kernel}
        with tempfile.TemporaryDirectory() as tmp:
            patched = Path(tmp) / Path(notebook).name
            nbformat.write(nb, str(patched))
            declared = papermill.inspect_notebook(str(patched))
    if not declared:
        raise CSAInputError(
            f"{notebook} has no cell tagged 'parameters': tag the cell that defines the defaults "
            "(including results_csv) so papermill can inject values"
        )
    wanted = list(dict.fromkeys([*names, RESULTS_PARAMETER]))
    unknown = [n for n in wanted if n not in declared]
    if unknown:
        raise CSAInputError(
            f"{notebook} has no parameter(s) {unknown}; its parameters are {sorted(declared)}: "
            "fix the names, or add them to the notebook's 'parameters' cell"
        )
    return declared


@dataclass
class BatchResult:
    """Outcome of :func:`run_grid`: all collected rows, the failed runs and the output paths."""

    table: pd.DataFrame
    failures: list[tuple[str, str]] = field(default_factory=list)
    results_csv: Path | None = None
    notebooks: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _error_text(exc: BaseException) -> str:
    ename = getattr(exc, "ename", None)
    evalue = getattr(exc, "evalue", None)
    if ename is not None:  # papermill.PapermillExecutionError: the exception raised in the notebook
        return f"{ename}: {evalue}"
    return f"{type(exc).__name__}: {exc}"


RUNNING = ".running"
FAILED = ".failed.ipynb"
#: The kernels' own log (transport warnings, the shutdown of an interrupted kernel) stays off the terminal:
#: a run's errors reach the user through its notebook and the batch's one-line report.
KERNEL_QUIET = ["--log-level=CRITICAL"]


def _comparable(values: dict[str, Any]) -> Any:
    """Parameters as they read back from a notebook's metadata (JSON), without ``results_csv``."""
    return json.loads(json.dumps({k: v for k, v in values.items() if k != RESULTS_PARAMETER}, default=str))


def _finished(notebook: Path, table: Path, parameters: dict[str, Any]) -> bool:
    """True when ``notebook`` is a finished run with these ``parameters`` and its table exists."""
    if not (notebook.is_file() and table.is_file()):
        return False
    try:
        meta = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {})
    except (OSError, ValueError):
        return False
    return not meta.get("exception") and _comparable(meta.get("parameters", {})) == _comparable(parameters)


#: The batch's record in its ``--out`` folder: which notebook and grid keys it runs, and the sha256 of every
#: finished run's table (a table edited by hand after its run no longer matches and is run again).
RECORD = "batch.json"


def _read_record(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CSAInputError(f"{path} is damaged ({exc}); remove it (the finished runs are run again) or choose "
                            f"another --out") from exc
    if not isinstance(record, dict) or not isinstance(record.get("tables", {}), dict):
        raise CSAInputError(f"{path} is damaged (not a batch record); remove it or choose another --out")
    return record


def _check_same_batch(out_dir: Path, record: dict[str, Any], notebook: Path, keys: list[str],
                      names: list[str]) -> None:
    """Refuse an ``--out`` folder that holds the runs of another notebook or grid (their results would be lost)."""
    ours = {f"{n}.ipynb" for n in names} | {f"{n}{FAILED}" for n in names}
    foreign = sorted(p.name for p in out_dir.glob("*.ipynb")
                     if p.name not in ours and not p.name.startswith("."))   # hidden: a killed run's leftovers
    other = record and (record.get("notebook") != notebook.stem or record.get("keys") != keys)
    # a folder from before batch.json existed is adopted when it holds runs of this grid
    unowned = not record and (out_dir / "results.csv").is_file() and not any((out_dir / f"{n}.ipynb").is_file()
                                                                            for n in names)
    if foreign or other or unowned:
        what = (f"runs of another grid ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''})" if foreign else
                f"the batch {record.get('notebook')!r} over {record.get('keys')}" if other else
                "a results.csv this batch did not write")
        raise CSAInputError(f"--out {out_dir} holds {what}; re-running there would replace its results.csv: choose "
                            f"another --out folder (or delete that one)")


def _write_record(out_dir: Path, notebook: Path, keys: list[str], tables: dict[str, str]) -> None:
    with atomic_write(out_dir / RECORD, "w") as f:
        json.dump({"notebook": notebook.stem, "keys": keys, "tables": tables}, f, indent=1, sort_keys=True)


def _remove_leftovers(*folders: Path) -> None:
    """Delete the temporary run files a killed batch left behind."""
    for folder in folders:
        for stale in folder.glob(f".*{RUNNING}.*"):
            stale.unlink(missing_ok=True)


def _check_grid_arguments(notebook: Path, grid: dict[str, list[Any]], params: dict[str, Any], kernel: str,
                          max_workers: int, out_dir: str | Path) -> None:
    """One clear error for a bad argument of :func:`run_grid`, before anything runs or is written."""
    if not notebook.is_file():
        raise CSAInputError(f"notebook {notebook} does not exist: pass the path of an .ipynb file")
    clash = sorted(set(grid) & set(params))
    if clash:
        raise CSAInputError(f"{clash} given both in --grid and --param: give each parameter once")
    if RESULTS_PARAMETER in grid or RESULTS_PARAMETER in params:
        raise CSAInputError(f"{RESULTS_PARAMETER!r} is set by the batch runner for each run: do not pass it")
    empty = [k for k, v in grid.items() if not v]
    if empty:
        raise CSAInputError(f"grid parameter(s) {empty} have no values: give at least one value each")
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise CSAInputError(f"max_workers must be >= 1, got {max_workers}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise CSAInputError(f"--out {out_dir} is a file, not a folder; give a folder for the notebooks and results")
    check_parameters(notebook, [*grid, *params], kernel=kernel)


@dataclass
class _Batch:
    """One batch in progress: its runs (grid points and their file names), where they go, and what finished."""

    notebook: Path
    params: dict[str, Any]
    keys: list[str]
    points: list[dict[str, Any]]
    names: list[str]
    out_dir: Path
    runs_dir: Path
    digests: dict[str, str]
    kernel: str
    cwd: Path
    force: bool
    tables: dict[int, pd.DataFrame] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)

    @property
    def results_csv(self) -> Path:
        return self.out_dir / "results.csv"

    def with_grid_columns(self, i: int, table: pd.DataFrame) -> pd.DataFrame:
        """Run ``i``'s table with its grid values as the first columns."""
        for position, key in enumerate(self.keys):
            if key in table.columns:
                table = table.drop(columns=key)
            table.insert(position, key, [self.points[i][key]] * len(table))
        return table

    def finished_table(self, i: int, parameters: dict[str, Any]) -> pd.DataFrame | None:
        """The table of run ``i`` when it already finished with these ``parameters`` (and ``force`` is off)."""
        final_nb, final_csv = self.out_dir / f"{self.names[i]}.ipynb", self.runs_dir / f"{self.names[i]}.csv"
        unchanged = final_csv.is_file() and self.digests.get(self.names[i]) == sha256_file(final_csv)
        if not self.force and final_csv.is_file() and not unchanged:
            print(f"[csa batch] {final_csv} changed after its run finished (edited by hand?): running "
                  f"{self.names[i]} again", file=sys.stderr, flush=True)
        if not self.force and unchanged and _finished(final_nb, final_csv, parameters):
            try:
                return self.with_grid_columns(i, pd.read_csv(final_csv))
            except Exception:  # noqa: BLE001 - an unreadable table: run again
                return None
        return None

    def run_one(self, i: int) -> tuple[int, pd.DataFrame | None, str | None]:
        """Execute run ``i`` (or reuse its finished table): ``(i, table, None)`` or ``(i, None, error)``."""
        import papermill

        name = self.names[i]
        final_nb, final_csv = self.out_dir / f"{name}.ipynb", self.runs_dir / f"{name}.csv"
        running_nb, running_csv = self.out_dir / f".{name}{RUNNING}.ipynb", self.runs_dir / f".{name}{RUNNING}.csv"
        parameters = {**self.params, **self.points[i], RESULTS_PARAMETER: str(running_csv.resolve())}
        table = self.finished_table(i, parameters)
        if table is not None:
            self.skipped.append(i)
            return i, table, None
        for stale in (final_nb, final_csv, self.out_dir / f"{name}{FAILED}"):
            stale.unlink(missing_ok=True)
        try:
            papermill.execute_notebook(
                str(self.notebook), str(running_nb), parameters=parameters,
                kernel_name=self.kernel, progress_bar=False, cwd=str(self.cwd),
                extra_arguments=KERNEL_QUIET,
            )
            if not running_csv.is_file():
                raise FileNotFoundError(f"the notebook finished but wrote no table to {RESULTS_PARAMETER}")
            table = pd.read_csv(running_csv)
        except Exception as exc:  # noqa: BLE001 - any failure of one run is reported, the batch goes on
            running_csv.unlink(missing_ok=True)
            if running_nb.is_file():
                os.replace(running_nb, self.out_dir / f"{name}{FAILED}")
            return i, None, _error_text(exc)
        except BaseException:  # Ctrl-C: nothing of this run looks finished
            running_csv.unlink(missing_ok=True)
            running_nb.unlink(missing_ok=True)
            raise
        os.replace(running_csv, final_csv)
        os.replace(running_nb, final_nb)
        return i, self.with_grid_columns(i, table), None

    def write_table(self) -> pd.DataFrame:
        """Write ``results.csv`` from every finished run so far, in grid order; return it."""
        frames = [self.tables[i] for i in sorted(self.tables)]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=self.keys)
        save_table(table, self.results_csv)
        return table

    def collect(self, i: int, table: pd.DataFrame | None, error: str | None) -> None:
        """Record the outcome of run ``i``: a finished table (and its digest) or a failure."""
        if error is None:
            self.tables[i] = table
            self.digests[self.names[i]] = sha256_file(self.runs_dir / f"{self.names[i]}.csv")
            _write_record(self.out_dir, self.notebook, self.keys, self.digests)
            self.write_table()
        else:
            self.failures[i] = error
            print(f"[csa batch] run {self.names[i]} FAILED: {error}", file=sys.stderr, flush=True)


def _start_batch(notebook: Path, grid: dict[str, list[Any]], out_dir: str | Path, params: dict[str, Any],
                 kernel: str, cwd: str | Path | None, force: bool) -> _Batch:
    """The runs of the grid, with ``out_dir`` checked, cleaned of a killed batch's leftovers and recorded."""
    run_cwd = Path(cwd) if cwd is not None else notebook.resolve().parent
    if not run_cwd.is_dir():
        raise CSAInputError(f"working directory {run_cwd} does not exist: pass an existing folder as cwd")
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    names = [run_name(notebook, p) for p in points]
    if len(set(names)) != len(names):
        raise CSAInputError("two grid points map to the same file name: make the grid values distinct as text")
    out_dir = check_output_dir(out_dir, "--out")
    record = _read_record(out_dir)
    _check_same_batch(out_dir, record, notebook, keys, names)
    runs_dir = check_output_dir(out_dir / "runs", "--out")
    _remove_leftovers(out_dir, runs_dir)
    remove_stale_temporaries(out_dir)
    remove_stale_temporaries(runs_dir)
    digests: dict[str, str] = dict(record.get("tables", {}))
    _write_record(out_dir, notebook, keys, digests)
    return _Batch(notebook, params, keys, points, names, out_dir, runs_dir, digests, kernel, run_cwd, force)


def _execute(batch: _Batch, max_workers: int, progress: bool) -> pd.DataFrame:
    """Run every point (one at a time, or ``max_workers`` at once) and return the final ``results.csv`` table.

    Interrupted (Ctrl-C or an error of the runner itself), ``results.csv`` still lists what finished.
    """
    bar = progress_bar(total=len(batch.points), desc=f"batch {batch.notebook.name}", disable=not progress)

    def collect(i: int, table: pd.DataFrame | None, error: str | None) -> None:
        batch.collect(i, table, error)
        bar.update(1)

    try:
        if max_workers == 1:  # in this thread: Ctrl-C reaches the running notebook at once
            for i in range(len(batch.points)):
                collect(*batch.run_one(i))
        else:
            pool = ThreadPoolExecutor(max_workers=max_workers)
            try:
                for future in as_completed([pool.submit(batch.run_one, i) for i in range(len(batch.points))]):
                    collect(*future.result())
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
    except BaseException:
        bar.close()
        with contextlib.suppress(Exception):  # keep what finished, even when interrupted
            batch.write_table()
        raise
    bar.close()
    return batch.write_table()


def run_grid(
    notebook: str | Path,
    grid: dict[str, list[Any]],
    out_dir: str | Path,
    params: dict[str, Any] | None = None,
    kernel: str = "python3",
    max_workers: int = 1,
    cwd: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> BatchResult:
    """Execute ``notebook`` once per point of the Cartesian product of ``grid`` and collect the tables.

    ``params`` are fixed for every run.  The notebooks run in ``cwd`` (default: the notebook's own
    folder, as in Jupyter, so relative paths inside it resolve the same way).  The rows of ``out_dir/results.csv`` come in grid order
    (first key slowest), each prefixed with the grid values; failed runs contribute no rows and are
    listed in ``BatchResult.failures`` as ``(run name, error)``.  Runs that already finished with the
    same parameters are skipped (listed in ``BatchResult.skipped``) unless ``force``.
    """
    notebook = Path(notebook)
    params = dict(params or {})
    _check_grid_arguments(notebook, grid, params, kernel, max_workers, out_dir)
    batch = _start_batch(notebook, grid, out_dir, params, kernel, cwd, force)
    final = _execute(batch, max_workers, progress)
    return BatchResult(
        table=final,
        failures=[(batch.names[i], batch.failures[i]) for i in sorted(batch.failures)],
        results_csv=batch.results_csv,
        notebooks=[batch.out_dir / f"{n}.ipynb" for n in batch.names],
        skipped=[batch.names[i] for i in sorted(batch.skipped)],
    )
