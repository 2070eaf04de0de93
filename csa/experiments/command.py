"""``csa demo build | extract | release | select | seeds | curve``: the embedded demo from the command line.

The demo's data (:func:`csa.data.demo.build_demo`), its descriptors with a first-stage report, the release of
its trained models, and the experiments of :mod:`csa.experiments.selection`, :mod:`~csa.experiments.seeds` and
:mod:`~csa.experiments.learning_curve` (CSV files in ``data/demo/results/``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

_DEFAULTS = argparse.ArgumentDefaultsHelpFormatter
_EXPERIMENTS = {"select": "choose the demo recipe on held-out landmarks of the training city",
                "seeds": "train with several seeds and measure the test-city gains",
                "curve": "learning curve: test-city gains against the share of training landmarks"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` and its verbs to the sub-commands of ``csa``."""
    parser = subparsers.add_parser("demo", help="build or describe the embedded Oxford/Paris demo")
    verbs = parser.add_subparsers(dest="demo_command", required=True)
    b = verbs.add_parser("build", help="build data/demo from the offline photo subsets", formatter_class=_DEFAULTS)
    b.add_argument("--source", default="../shared/data", help="offline data folder")
    b.add_argument("--out", default="data/demo", help="demo data root to write")
    b.add_argument("--quality", type=int, default=75, help="JPEG quality")
    _add_extract_parser(verbs)
    r = verbs.add_parser("release", help="copy the trained demo models to <root>/weights with their manifest",
                         formatter_class=_DEFAULTS)
    r.add_argument("--runs", default="runs/demo", help="folder with <trainset>/checkpoint.pth of both cities")
    r.add_argument("--root", default="data/demo")
    r.add_argument("--nproc-per-node", type=int, default=2, help="processes the runs used (recorded)")
    for name, text in _EXPERIMENTS.items():
        _add_experiment_parser(verbs, name, text)
    parser.set_defaults(run=run)
    return parser


def _add_extract_parser(verbs: Any) -> None:
    e = verbs.add_parser("extract", help="extract lite0/1/2-gem descriptors and print first-stage results",
                         formatter_class=_DEFAULTS)
    e.add_argument("--root", default="data/demo")
    e.add_argument("--image-size", type=int, default=512)
    e.add_argument("--scales", default="1", help="comma-separated scales, e.g. 1,0.7071,1.4142")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--backbone", default="lite0", choices=["lite0", "lite1", "lite2"],
                   help="offline EfficientNet-Lite GeM backbone")
    e.add_argument("--name", default=None, help="feature name (default: <backbone>-gem)")
    e.add_argument("--force", action="store_true", help="re-extract even when outputs are up to date")
    e.add_argument("--no-report", action="store_true", help="skip the first-stage evaluation")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--shard-size", type=int, default=None,
                   help="images per resumable shard (default: 64); under torchrun rank r of N extracts shards "
                        "r, r+N, ...")


def _add_experiment_parser(verbs: Any, name: str, text: str) -> None:
    x = verbs.add_parser(name, help=text, formatter_class=_DEFAULTS)
    x.add_argument("--root", default="data/demo")
    x.add_argument("--trainset", required=True, choices=["rparis6k-mini-train", "roxford5k-mini-train"])
    x.add_argument("--out", required=True, type=Path, help="CSV file to write")
    if name == "select":
        x.add_argument("--folds", type=int, default=3, help="landmark folds")
    else:
        x.add_argument("--setting", required=True, help="a setting of csa.experiments.selection.GRID")
        x.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2] if name == "seeds" else [0])
    if name == "curve":
        x.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])


def run(args: argparse.Namespace) -> int:
    """Run the ``csa demo`` verb named in ``args.demo_command``."""
    if args.demo_command in _EXPERIMENTS:
        return _experiment(args)
    if args.demo_command == "release":
        return _release(args)
    if args.demo_command == "build":
        import json

        from csa.data.demo import build_demo

        print(json.dumps(build_demo(args.source, args.out, args.quality), indent=1))
        return 0
    return _extract(args)


def _experiment(args: argparse.Namespace) -> int:
    from csa.experiments.held_out import check_experiment
    from csa.experiments.learning_curve import learning_curve
    from csa.experiments.seeds import seed_sweep
    from csa.experiments.selection import GRID, choose, select_recipe
    from csa.fileio import save_table

    check_experiment(args.root, args.trainset, args.out, getattr(args, "folds", None), getattr(args, "seeds", None),
                     getattr(args, "fractions", None), getattr(args, "setting", None))
    if args.demo_command == "select":
        table = select_recipe(args.root, args.trainset, n_folds=args.folds)
        print(table.groupby("setting", sort=False)["medium_gain"].agg(["mean", "min", "max"]).round(2).to_string())
        print(f"chosen: {choose(table)}")
    elif args.demo_command == "seeds":
        table = seed_sweep(args.root, args.trainset, GRID[args.setting], args.seeds)
    else:
        table = learning_curve(args.root, args.trainset, GRID[args.setting], args.fractions, args.seeds)
    if args.demo_command != "select":
        table.insert(1, "setting", args.setting)
    print(f"wrote {save_table(table, args.out)}")
    return 0


def _release(args: argparse.Namespace) -> int:
    from csa.checkpoint import load_checkpoint
    from csa.experiments.held_out import TRAIN_TO_TEST
    from csa.training.config import TrainConfig
    from csa.training.launch import torchrun_text
    from csa.training.release import release

    for trainset in TRAIN_TO_TEST:
        checkpoint = Path(args.runs, trainset, "checkpoint.pth")
        config = TrainConfig(**load_checkpoint(checkpoint)["train_config"])
        command = torchrun_text(config, args.nproc_per_node)
        out = release(checkpoint, args.root, trainset, config.recipe, command, TRAIN_TO_TEST[trainset])
        print(f"released {checkpoint} -> {out}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    import torch

    from csa.compare.runner import first_stage_report
    from csa.data.demo import CITIES
    from csa.descriptors.distributed import in_extraction_group
    from csa.descriptors.extract import parse_scales
    from csa.descriptors.prepare import prepare_demo_features
    from csa.validation import check_int

    for flag, value, low in (("--image-size", args.image_size, 1), ("--batch-size", args.batch_size, 1),
                             ("--workers", args.workers, 0), ("--threads", args.threads or 1, 1),
                             ("--shard-size", args.shard_size or 1, 1)):
        check_int(flag, value, low)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or f"{args.backbone}-gem"
    scales = parse_scales(args.scales, "--scales")
    paths = in_extraction_group("auto", lambda ranks: prepare_demo_features(
        args.root, args.image_size, scales, args.batch_size, args.workers, args.force, name,
        shard_size=args.shard_size, ranks=ranks, backbone=args.backbone))
    for key, p in paths.items():  # empty on the ranks other than 0
        print(f"{key}: {p}")
    if paths and not args.no_report:
        for dataset in CITIES:
            print(first_stage_report(args.root, dataset, name)[1])
    return 0
