"""``csa extract``: descriptors of a dataset (one process, or one per GPU or machine under torchrun)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

DATASETS = ["demo", "roxford5k", "rparis6k", "rsfm120k", "r1m"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``extract`` to the sub-commands of ``csa``."""
    p = subparsers.add_parser("extract", help=f"descriptors of a dataset: {' | '.join(DATASETS)}",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              epilog="on several GPUs or machines: torchrun --nproc_per_node=N [--nnodes ... "
                                     "--rdzv-...] -m csa extract <the same arguments>")
    p.add_argument("dataset", choices=DATASETS)
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
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Extract (resuming finished shards) and print the files written (by rank 0 only)."""
    from csa.descriptors.distributed import in_extraction_group
    from csa.descriptors.extract import parse_scales
    from csa.descriptors.prepare import prepare
    from csa.validation import check_int

    for flag, value, low in (("--image-size", args.image_size, 1), ("--workers", args.workers, 0),
                             ("--shard-size", args.shard_size, 1)):
        if value is not None:
            check_int(flag, value, low)
    scales = parse_scales(args.scales, "--scales") if args.scales else None
    written = in_extraction_group(args.device, lambda ranks: prepare(
        args.dataset, args.data_root, args.backbone, image_size=args.image_size, scales=scales, device=args.device,
        num_workers=args.workers, download=args.download, force=args.force, shard_size=args.shard_size,
        ranks=ranks))
    for key, path in written.items():  # empty on the ranks other than 0
        print(f"{key}: {path}")
    return 0
