"""Command-line interface: ``csa train | rerank | evaluate | demo | download``.

Each sub-command is a thin wrapper around the library; ``csa <command> --help`` lists every flag with its
default (the paper's recipe where one exists).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_CHECKPOINT_HELP = "checkpoint written by `csa train` or by the official CSA code ({'epoch', 'state_dict'})"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, type=Path, help="data root (see data/README.md for the layout)")
    p.add_argument("--dataset", required=True, help="test dataset, e.g. roxford5k, rparis6k, roxford5k-mini")
    p.add_argument("--features", required=True, help="feature name: reads test/<dataset>/<features>.pkl")
    p.add_argument("--r1m", type=Path, default=None, help="optional distractor descriptors (.npy) appended to the database")


def _load_eval_inputs(args: argparse.Namespace):
    from csa.datasets import load_gnd, load_test_features

    gnd = load_gnd(args.data_root, args.dataset)
    feats = load_test_features(args.data_root, args.dataset, args.features)
    qvecs, dbvecs = feats.query, feats.db
    if args.r1m is not None:
        from csa.r1m import append_distractors

        dbvecs = np.asarray(append_distractors(dbvecs, args.r1m, dtype="float32"))
    return qvecs, dbvecs, gnd["gnd"]


def _cmd_rerank(args: argparse.Namespace) -> int:
    from csa.checkpoint import load_model
    from csa.evaluate import evaluate_revisited, format_revisited
    from csa.prepare import resolve_device
    from csa.rerank import rerank
    from csa.search import first_stage

    qvecs, dbvecs, gnd = _load_eval_inputs(args)
    device = resolve_device(args.device)
    ranks = first_stage(qvecs, dbvecs)
    print(format_revisited(args.dataset, evaluate_revisited(ranks, gnd), method="first stage"))
    overrides = {} if args.anchor_len is None else {"anchor_len": args.anchor_len}
    model = load_model(args.checkpoint, device=device, **overrides)
    anchor_len = model.config["anchor_len"]
    start = time.perf_counter()
    reranked = rerank(model, qvecs, dbvecs, ranks, topk=args.topk, anchor_len=anchor_len,
                      batch_size=args.batch_size, device=device, precision=args.precision)
    elapsed = time.perf_counter() - start
    print(format_revisited(args.dataset, evaluate_revisited(reranked, gnd), method=f"CSA top-{args.topk}"))
    print(f">> re-ranking took {elapsed:.2f} s ({1000 * elapsed / len(qvecs):.1f} ms per query, {device}, {args.precision})")
    if args.output is not None:
        from csa.io import atomic_write

        with atomic_write(args.output) as f:
            np.save(f, np.asarray(reranked))
        print(f">> wrote re-ranked ranks {np.asarray(reranked).shape} to {args.output}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from csa.evaluate import evaluate_revisited, format_revisited
    from csa.search import first_stage

    qvecs, dbvecs, gnd = _load_eval_inputs(args)
    if args.ranks is not None:
        ranks = np.load(args.ranks)
        method = str(args.ranks)
    else:
        ranks = first_stage(qvecs, dbvecs)
        method = "first stage"
    print(format_revisited(args.dataset, evaluate_revisited(ranks, gnd), method=method))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("train", help="train a CSA model (also under torchrun); `csa train --help`", add_help=False)
    sub.add_parser("demo", help="build / extract the embedded Oxford-Paris demo; `csa demo --help`", add_help=False)
    sub.add_parser("download", help="download the full data (ROxf, RPar, R1M, rSfM120k, networks)", add_help=False)

    p = sub.add_parser("rerank", help="first stage + CSA re-ranking + revisited evaluation",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(p)
    p.add_argument("--checkpoint", required=True, type=Path, help=DEFAULT_CHECKPOINT_HELP)
    p.add_argument("--topk", type=int, default=1024, help="candidates re-ranked (K; paper's test recipe)")
    p.add_argument("--anchor-len", type=int, default=None,
                   help="anchors: query + top L-1 (L); default: the checkpoint's L (the paper: 512)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--output", type=Path, default=None, help="save the re-ranked (N, Q) ranks as .npy")
    p.set_defaults(func=_cmd_rerank)

    p = sub.add_parser("evaluate", help="revisited E/M/H evaluation of saved ranks (default: the first stage)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(p)
    p.add_argument("--ranks", type=Path, default=None, help="(N, Q) ranks as .npy; default: first-stage ranking")
    p.set_defaults(func=_cmd_evaluate)
    return parser


_DELEGATED = {"train": "csa.train", "demo": "csa.demo", "download": "csa.download"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        import importlib

        module = importlib.import_module(_DELEGATED[argv[0]])
        result = module.main(argv[1:])
        return int(result or 0)
    args = build_parser().parse_args(argv)
    from csa.validation import CSAInputError

    try:
        return int(args.func(args) or 0)
    except CSAInputError as exc:
        print(f"csa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
