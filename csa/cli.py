"""Command-line interface: ``csa train | rerank | evaluate | extract | demo | download | batch``.

Each sub-command is a thin wrapper around the library; ``csa <command> --help`` lists every flag with its
default (the paper's recipe where one exists).  Every sub-command reports a problem as one line
``csa <command>: error: ...`` on stderr and a non-zero exit status (2 for bad input and usage,
1 for other failures, 130 for Ctrl-C), never as a traceback (:func:`csa.validation.run_command`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

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


def _scales(text: str) -> list[float]:
    from csa.descriptors.extract import parse_scales

    return parse_scales(text, "--scales")


def _under_torchrun(device: str, body):
    """``body(ranks)`` in the process group of a torchrun extraction (``ranks`` None for one process)."""
    from csa.descriptors.distributed import join_extraction_group, leave_extraction_group

    ranks = join_extraction_group(device)
    try:
        return body(ranks)
    finally:
        leave_extraction_group(ranks)


def _cmd_extract(args: argparse.Namespace) -> int:
    from csa.descriptors.prepare import prepare
    from csa.validation import check_int

    for flag, value, low in (("--image-size", args.image_size, 1), ("--workers", args.workers, 0),
                             ("--shard-size", args.shard_size, 1)):
        if value is not None:
            check_int(flag, value, low)
    scales = _scales(args.scales) if args.scales else None
    written = _under_torchrun(args.device, lambda ranks: prepare(
        args.dataset, args.data_root, args.backbone, image_size=args.image_size, scales=scales, device=args.device,
        num_workers=args.workers, download=args.download, force=args.force, shard_size=args.shard_size,
        ranks=ranks))
    for key, path in written.items():  # empty on the ranks other than 0
        print(f"{key}: {path}")
    return 0


def _cmd_demo_experiment(args: argparse.Namespace) -> int:
    from csa.fileio import save_table
    from csa.training import selection

    selection.check_experiment(args.root, args.trainset, args.out, getattr(args, "folds", None),
                               getattr(args, "seeds", None), getattr(args, "fractions", None),
                               getattr(args, "setting", None))
    if args.demo_command == "select":
        table = selection.select_recipe(args.root, args.trainset, n_folds=args.folds)
        print(table.groupby("setting", sort=False)["medium_gain"].agg(["mean", "min", "max"]).round(2).to_string())
        print(f"chosen: {selection.choose(table)}")
    elif args.demo_command == "seeds":
        table = selection.seed_sweep(args.root, args.trainset, selection.GRID[args.setting], args.seeds)
    else:
        table = selection.learning_curve(args.root, args.trainset, selection.GRID[args.setting], args.fractions,
                                         args.seeds)
    if args.demo_command != "select":
        table.insert(1, "setting", args.setting)
    print(f"wrote {save_table(table, args.out)}")
    return 0


def _cmd_demo_release(args: argparse.Namespace) -> int:
    from csa.checkpoint import load_checkpoint
    from csa.training.config import TrainConfig, config_to_argv
    from csa.training.release import release
    from csa.training.selection import TRAIN_TO_TEST

    for trainset in TRAIN_TO_TEST:
        checkpoint = Path(args.runs, trainset, "checkpoint.pth")
        config = TrainConfig(**load_checkpoint(checkpoint)["train_config"])
        command = (f"torchrun --standalone --nproc_per_node={args.nproc_per_node} -m csa.training "
                   + " ".join(config_to_argv(config)))
        out = release(checkpoint, args.root, trainset, config.recipe, command, TRAIN_TO_TEST[trainset])
        print(f"released {checkpoint} -> {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.demo_command in ("select", "seeds", "curve"):
        return _cmd_demo_experiment(args)
    if args.demo_command == "release":
        return _cmd_demo_release(args)
    if args.demo_command == "build":
        import json

        from csa.data.demo import build_demo

        print(json.dumps(build_demo(args.source, args.out, args.quality), indent=1))
        return 0
    import torch

    from csa.compare.runner import first_stage_report
    from csa.data.demo import CITIES
    from csa.descriptors.prepare import prepare_demo_features
    from csa.validation import check_int

    for flag, value, low in (("--image-size", args.image_size, 1), ("--batch-size", args.batch_size, 1),
                             ("--workers", args.workers, 0), ("--threads", args.threads or 1, 1),
                             ("--shard-size", args.shard_size or 1, 1)):
        check_int(flag, value, low)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or f"{args.backbone}-gem"
    paths = _under_torchrun("auto", lambda ranks: prepare_demo_features(
        args.root, args.image_size, _scales(args.scales), args.batch_size, args.workers, args.force, name,
        shard_size=args.shard_size, ranks=ranks, backbone=args.backbone))
    for key, p in paths.items():  # empty on the ranks other than 0
        print(f"{key}: {p}")
    if paths and not args.no_report:
        for dataset in CITIES:
            print(first_stage_report(args.root, dataset, name)[1])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csa", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("train", help="train a CSA model (also under torchrun); see: csa train --help", add_help=False)
    sub.add_parser("download", help="download the full data (ROxf, RPar, R1M, rSfM120k, networks)", add_help=False)
    sub.add_parser("batch", help="run a notebook over a parameter grid with papermill; see: csa batch --help",
                   add_help=False)

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
    p.set_defaults(func=_cmd_rerank)

    p = sub.add_parser("evaluate", help="revisited E/M/H evaluation of saved ranks (default: the first stage)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(p)
    p.add_argument("--ranks", type=Path, default=None,
                   help="(N, Q) ranks as .npy (with --r1m also the top rows saved by csa rerank --r1m); "
                        "default: first-stage ranking")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("extract", help="descriptors of a dataset: demo | roxford5k | rparis6k | rsfm120k | r1m",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="on several GPUs or machines: torchrun --nproc_per_node=N [--nnodes ... --rdzv-...] "
                              "-m csa extract <the same arguments>")
    p.add_argument("dataset", choices=["demo", "roxford5k", "rparis6k", "rsfm120k", "r1m"])
    p.add_argument("--data-root", required=True, type=Path, help="data root (the demo: data/demo)")
    p.add_argument("--backbone", default="lite0", help="lite0 (offline) or a cirtorch network, e.g. "
                                                       "gl18-tl-resnet101-gem-w (in <data-root>/networks/)")
    p.add_argument("--image-size", type=int, default=None, help="long side in pixels (default: 512 demo, 1024 full)")
    p.add_argument("--scales", default=None, help="comma-separated scales (default: 1 demo and rSfM120k, "
                                                  "1,0.7071,1.4142 test sets and R1M)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=None, help="image loader processes")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per resumable shard (default: 64 test sets, 256 rSfM120k, 4096 R1M); under "
                        "torchrun rank r of N extracts shards r, r+N, ...")
    p.add_argument("--download", action="store_true", help="download images, annotations and networks first")
    p.add_argument("--force", action="store_true", help="re-extract even when the output is up to date")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("demo", help="build or describe the embedded Oxford/Paris demo")
    demo = p.add_subparsers(dest="demo_command", required=True)
    b = demo.add_parser("build", help="build data/demo from the offline photo subsets",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--source", default="../shared/data", help="offline data folder")
    b.add_argument("--out", default="data/demo", help="demo data root to write")
    b.add_argument("--quality", type=int, default=75, help="JPEG quality")
    e = demo.add_parser("extract", help="extract lite0/1/2-gem descriptors and print first-stage results",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    r = demo.add_parser("release", help="copy the trained demo models to <root>/weights with their manifest",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--runs", default="runs/demo", help="folder with <trainset>/checkpoint.pth of both cities")
    r.add_argument("--root", default="data/demo")
    r.add_argument("--nproc-per-node", type=int, default=2, help="processes the runs used (recorded)")
    for name, text in (("select", "choose the demo recipe on held-out landmarks of the training city"),
                       ("seeds", "train with several seeds and measure the test-city gains"),
                       ("curve", "learning curve: test-city gains against the share of training landmarks")):
        x = demo.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        x.add_argument("--root", default="data/demo")
        x.add_argument("--trainset", required=True, choices=["rparis6k-mini-train", "roxford5k-mini-train"])
        x.add_argument("--out", required=True, type=Path, help="CSV file to write")
        if name == "select":
            x.add_argument("--folds", type=int, default=3, help="landmark folds")
        else:
            x.add_argument("--setting", required=True, help="a setting of csa.training.selection.GRID")
            x.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2] if name == "seeds" else [0])
        if name == "curve":
            x.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.set_defaults(func=_cmd_demo)
    return parser


_DELEGATED = {"train": "csa.training.train", "download": "csa.data.download", "batch": "csa.notebook.batch"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        import importlib

        module = importlib.import_module(_DELEGATED[argv[0]])
        result = module.main(argv[1:])
        return int(result or 0)
    args = build_parser().parse_args(argv)
    from csa.validation import run_command

    return run_command(f"csa {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
