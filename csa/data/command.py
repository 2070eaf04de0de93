"""``csa download``: the download command's flags and what it runs (:mod:`csa.data.download`)."""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``download`` to the sub-commands of ``csa``."""
    from csa.data.download import DATASETS, MIRROR_ENV, __doc__ as about

    parser = subparsers.add_parser("download", help="download the full data (ROxf, RPar, R1M, rSfM120k, networks)",
                                   description=about.split("\n")[0].replace("``", ""))
    parser.add_argument("names", nargs="*", help=f"datasets ({', '.join(DATASETS)}) or resource names")
    parser.add_argument("--data-root", default="data", help="data root (default: ./data)")
    parser.add_argument("--mirror", default=None, help=f"base URL of a flat mirror (default: ${MIRROR_ENV} "
                                                        f"or the official hosts)")
    parser.add_argument("--keep-archives", action="store_true", help="keep downloaded archives")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list datasets and resources, then exit")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """List the resources (``--list`` or no name), or download the named ones, printing each installed path."""
    from csa.data.download import download_names, resource_listing

    if args.list or not args.names:
        print(resource_listing())
        return 0
    download_names(args.names, args.data_root, progress=not args.no_progress, base_url=args.mirror,
                   keep_archive=args.keep_archives, echo=print)
    return 0
