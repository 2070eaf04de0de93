"""``csa train``: the training command's flags (one per :class:`~csa.training.config.TrainConfig` field) and
what it runs.  ``python -m csa.training`` and ``torchrun -m csa.training`` are the same command."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from csa.training.config import DESCRIPTION, add_arguments, config_from_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to the sub-commands of ``csa``."""
    parser = subparsers.add_parser("train", help="train a CSA model (also under torchrun); see: csa train --help",
                                   description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train (or, with ``--dry-run``, print the resolved configuration as JSON)."""
    from csa.training.launch import peer_lost_error
    from csa.training.recipes import effective_lrs
    from csa.training.train import run_training

    config, dry_run = config_from_args(args)
    if dry_run:
        config.check()
        print(json.dumps({"config": asdict(config), "overrides": config.recipe_overrides(),
                          "effective_lrs": effective_lrs(asdict(config))}, indent=1))
        return 0
    try:
        run_training(config)
    except RuntimeError as exc:  # a peer process died: say so instead of the socket error
        lost = peer_lost_error(exc)
        if lost is None:
            raise
        raise lost from exc
    return 0
