"""Command-line interface: ``csa train | rerank | evaluate | extract | demo | download | batch``.

Each sub-command is a thin wrapper around the library; ``csa <command> --help`` lists every flag with its
default (the paper's recipe where one exists).  Every sub-command reports a problem as one line
``csa <command>: error: ...`` on stderr and a non-zero exit status (2 for bad input and usage,
1 for other failures, 130 for Ctrl-C), never as a traceback (:func:`csa.cli_errors.run_command`).
One parser serves them all: ``rerank`` and ``evaluate`` are defined here, every other sub-command by the
``command`` module of its wing (``add_parser`` and ``run``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CHECKPOINT_HELP = "checkpoint written by csa train or by the official CSA code ({'epoch', 'state_dict'})"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, type=Path, help="data root (see data/README.md for the layout)")
    p.add_argument("--dataset", required=True, help="test dataset, e.g. roxford5k, rparis6k, roxford5k-mini")
    p.add_argument("--features", required=True, help="feature name: reads test/<dataset>/<features>.pkl")
    p.add_argument("--r1m", type=Path, default=None,
                   help="optional distractor descriptors (.npy) appended to the database; read from the memory map "
                        "chunk by chunk (csa.largescale), never loaded whole")


def _load_benchmark(args: argparse.Namespace):
    from csa.data.benchmark import Benchmark

    return Benchmark.load(args.data_root, args.dataset, args.features, r1m=args.r1m)


def _cmd_rerank(args: argparse.Namespace) -> int:
    from csa.checkpoint import load_model
    from csa.device import resolve_device
    from csa.evaluate import format_revisited
    from csa.search import rerank_depth

    if args.output is not None:  # before any work: a bad location fails now, not after the re-ranking
        from csa.fileio import check_output_file

        check_output_file(args.output, "--output")
    device = resolve_device(args.device)
    overrides = {key: value for key, value in (("anchor_len", args.anchor_len), ("num_heads", args.num_heads))
                 if value is not None}
    model = load_model(args.checkpoint, device=device, **overrides)
    bench = _load_benchmark(args)
    # in memory the whole ranking; with --r1m a streamed first stage and re-ranking from the short lists' rows
    first = bench.first_stage(depth=rerank_depth(args.topk, model.config["anchor_len"]), progress=True)
    print(format_revisited(args.dataset, first.evaluate(), method="first stage"))
    start = time.perf_counter()
    reranked = bench.rerank_csa(model, first, args.topk, batch_size=args.batch_size, device=device,
                                precision=args.precision)
    elapsed = time.perf_counter() - start
    results = first.evaluate(reranked)
    print(format_revisited(args.dataset, results, method=f"CSA top-{args.topk}"))
    print(f">> re-ranking took {elapsed:.2f} s ({1000 * elapsed / bench.n_queries:.1f} ms per query, {device}, "
          f"{args.precision})")
    if args.output is not None:
        from csa.fileio import atomic_write

        with atomic_write(args.output) as f:
            np.save(f, np.asarray(reranked))
        print(f">> wrote re-ranked ranks {np.asarray(reranked).shape} to {args.output}")
    return 0


def _load_ranks(path: Path) -> np.ndarray:
    """The (N, Q) integer array saved with ``np.save`` at ``path`` (``--ranks``), or one clear error."""
    from csa.validation import CSAInputError

    if not path.is_file():
        raise CSAInputError(f"--ranks {path}: no such file; give the .npy written by `csa rerank --output`")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        what = "an .npz archive" if magic.startswith(b"PK") else "not a .npy array file (np.save format)"
        raise CSAInputError(f"--ranks {path}: it is {what}; save the (N, Q) integer ranks with np.save")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise CSAInputError(f"--ranks {path}: it holds Python objects (an object array), not integer "
                                f"indices; save the (N, Q) integer ranks with np.save") from exc
        raise CSAInputError(f"--ranks {path}: cannot be read ({exc}); the file is damaged") from exc
    except (OSError, EOFError) as exc:
        raise CSAInputError(f"--ranks {path}: cannot be read ({exc}); the file is truncated") from exc


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from csa.evaluate import format_revisited

    ranks = _load_ranks(args.ranks) if args.ranks is not None else None
    results = _load_benchmark(args).evaluate(ranks, progress=True)  # with --r1m: saved ranks may be the re-ordered top rows
    print(format_revisited(args.dataset, results, method="first stage" if ranks is None else str(args.ranks)))
    return 0


def _add_rerank_parser(sub: Any) -> None:
    p = sub.add_parser("rerank", help="first stage + CSA re-ranking + revisited evaluation",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(p)
    p.add_argument("--checkpoint", required=True, type=Path, help=CHECKPOINT_HELP)
    p.add_argument("--topk", type=int, default=1024, help="candidates re-ranked (K; paper's test recipe)")
    p.add_argument("--anchor-len", type=int, default=None,
                   help="anchors: query + top L-1 (L); default: the checkpoint's L (the paper: 512)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of an official checkpoint, which does not record them "
                        "(default: the checkpoint's config; official files: 12, the paper's value, with a warning)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--output", type=Path, default=None,
                   help="save the re-ranked (N, Q) ranks as .npy (with --r1m: the re-ranked top max(K, L-1) rows)")
    p.set_defaults(run=_cmd_rerank)


def _add_evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="revisited E/M/H evaluation of saved ranks (default: the first stage)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(p)
    p.add_argument("--ranks", type=Path, default=None,
                   help="(N, Q) ranks as .npy (with --r1m also the top rows saved by csa rerank --r1m); "
                        "default: first-stage ranking")
    p.set_defaults(run=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    """The one parser of every ``csa`` sub-command: each wing adds its own (``add_parser(subparsers)``) and
    names the function that runs it (``args.run``); ``rerank`` and ``evaluate`` are the paper's, defined here."""
    from csa.data import command as data_command
    from csa.descriptors import command as descriptors_command
    from csa.experiments import command as demo_command
    from csa.notebook import command as batch_command
    from csa.training import command as training_command

    parser = argparse.ArgumentParser(prog="csa", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    training_command.add_parser(sub)
    data_command.add_parser(sub)
    batch_command.add_parser(sub)
    _add_rerank_parser(sub)
    _add_evaluate_parser(sub)
    descriptors_command.add_parser(sub)
    demo_command.add_parser(sub)
    _name_own_parsers(parser)
    return parser


def _name_own_parsers(parser: argparse.ArgumentParser) -> None:
    """Let every sub-command's parser know itself (``args.own_parser``), so that :func:`main` reports a flag
    it does not know as that sub-command's usage error (``csa train: error: ...``), not the top level's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(own_parser=sub)
                _name_own_parsers(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """``csa <command> ...`` (also ``python -m csa``, and ``python -m csa.training`` for ``train``): the exit status.

    Every sub-command ends the same way (:func:`csa.cli_errors.run_command`): its own errors as one line
    ``csa <command>: error: ...``, exit 2 for bad input, 1 for other failures, 130 for Ctrl-C.
    """
    from csa.cli_errors import run_command

    args, unknown = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if unknown:
        args.own_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return run_command(f"csa {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
