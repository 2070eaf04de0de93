"""One extraction process for the multi-process tests: ``python _extract_worker.py IMAGES SHARDS OUT [options]``,
alone or under torchrun.  A small deterministic network; rank 0 saves the rows to OUT/rows.npy, every rank
writes how many images it computed to OUT/seen-<rank>.txt.  ``--die-after K`` makes rank ``--die-rank`` kill
itself (SIGKILL) when it is given its (K+1)-th image; ``--gate FILE`` makes the network wait for FILE first."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from csa.descriptors.distributed import join_extraction_group, leave_extraction_group
from csa.descriptors.extract import extract_descriptors
from csa.cli_errors import run_command


class TinyNet(torch.nn.Module):
    def __init__(self, die_after: int | None, gate: Path | None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.meta = {"mean": [0.5] * 3, "std": [0.5] * 3, "outputdim": 8, "architecture": "tiny"}
        self.seen, self.die_after, self.gate = 0, die_after, gate

    def forward(self, x):
        while self.gate is not None and not self.gate.exists():
            time.sleep(0.05)
        if self.die_after is not None and self.seen + x.shape[0] > self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        self.seen += x.shape[0]
        f = torch.relu(self.conv(x)).clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        return f / f.norm(dim=1, keepdim=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("images", type=Path)
    p.add_argument("shards", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--shard-size", type=int, default=2)
    p.add_argument("--die-after", type=int, default=None)
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--gate", type=Path, default=None)
    args = p.parse_args(argv)

    def body() -> int:
        ranks = join_extraction_group("cpu")
        rank = 0 if ranks is None else ranks.rank
        net = TinyNet(args.die_after if rank == args.die_rank else None, args.gate)
        try:
            rows = extract_descriptors(net, sorted(args.images.glob("*.png")), image_size=64, batch_size=1,
                                       shard_dir=args.shards, shard_size=args.shard_size, device="cpu",
                                       progress=False, ranks=ranks)
        finally:
            leave_extraction_group(ranks)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"seen-{rank}.txt").write_text(str(net.seen))
        if rows is not None:
            np.save(args.out / "rows.npy", rows)
        return 0

    return run_command("extract-worker", body)


if __name__ == "__main__":
    sys.exit(main())
