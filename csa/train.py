"""Train a CSA re-ranker: ``python -m csa.train ...`` or ``torchrun --nproc_per_node=N -m csa.train ...``.

Every training image is a query; its self + top-K neighbours (rows, 1..K shuffled per sample) and
self + top L-1 neighbours (anchors) give a (K+1, L) affinity matrix built per batch on the device.
The defaults are the paper's recipe (official ``experiment_rSfm120k.sh``).

Differences from the official train.py, on purpose:

* Learning rates are multiplied by ``global_batch / 256`` (``--lr-scaling``). The official code
  divided the batch size by the number of GPUs *before* scaling, so its 4-GPU run of "batch 256,
  base lr 0.1" really used lr 0.025 (warm-up 0.00025). To replay that run exactly pass
  ``--base-lr 0.025 --warmup-lr 0.00025``.
* Gradient clipping at norm 1.0 is on (the README says so; the official code left it off).
* The global batch is the same for any number of processes (split B / world per rank), the sample
  order is one global permutation per epoch, and the row permutations are functions of
  (seed, epoch, sample): one process and N processes see the same batches.
* Tokens are the query + K neighbours (K+1 rows, as at test time); the official training used the
  query + K-1 neighbours (its ``topk`` counted the query).
* Checkpoints hold the optimizer, schedule, scaler and RNG states, and ``--resume`` continues
  exactly; files are written atomically.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from csa.datasets import (GlobalBatchSampler, NeighbourTable, TrainingSet, load_clusters, load_train_features,
                          neighbour_cache_path)
from csa.engine import WarmupCosineSchedule, build_optimizer, train_one_epoch, unwrap
from csa.io import atomic_write
from csa.losses import CSACriterion
from csa.model import RerankTransformer
from csa.validation import CSAInputError

__all__ = ["TrainConfig", "build_parser", "main", "run_training", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pth"
HISTORY_COLUMNS = ["epoch", "lr", "loss", "contrastive", "reconstruction", "skipped", "time"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every hyper-parameter of a training run; defaults are the paper's recipe."""

    # data
    data_root: str = _f("data", "data root (annotations/, train/, cache/ inside)")
    trainset: str = _f("retrieval-SfM-120k", "training set name (annotations/<trainset>.pkl)")
    feature_names: list[str] = _f(["gl18-tl-resnet101-gem-w"], "feature sets; several = the paper's augmentation "
                                  "(e.g. gl18-tl-resnet50-gem-w gl18-tl-resnet101-gem-w gl18-tl-resnet152-gem-w)")
    split: str = _f("train", "annotation split used for training")
    cache_dir: str | None = _f(None, "neighbour-table cache folder (default: <data_root>/cache)")
    neighbour_chunk: int = _f(1024, "queries per chunk when computing the neighbour table")
    # model
    topk: int = _f(512, "K: neighbours per sample (tokens = query + K)")
    anchor_len: int = _f(512, "L: anchors (query + L-1 neighbours)")
    embed_dim: int = _f(768, "C: token dimension")
    depth: int = _f(2, "transformer blocks")
    num_heads: int = _f(12, "attention heads")
    mlp_ratio: float = _f(4.0, "MLP hidden size / C")
    qkv_bias: bool = _f(True, "bias in the qkv projection")
    drop_rate: float = _f(0.1, "dropout")
    attn_drop_rate: float = _f(0.1, "attention dropout")
    drop_path_rate: float = _f(0.1, "stochastic depth (drop-path) rate of the last block")
    # loss
    alpha: float = _f(0.2, "weight of the reconstruction loss")
    temperature: float = _f(2.0, "temperature t of the contrastive loss")
    # optimisation
    batch_size: int = _f(256, "GLOBAL batch size (split evenly over processes)")
    num_epochs: int = _f(100, "epochs of the schedule")
    stop_at_epoch: int | None = _f(None, "stop after this epoch (the schedule still spans --num-epochs)")
    warmup_epochs: int = _f(20, "linear warm-up epochs")
    warmup_lr: float = _f(0.001, "lr at the start of warm-up (before batch scaling)")
    base_lr: float = _f(0.1, "lr at the end of warm-up (before batch scaling)")
    final_lr: float = _f(0.0, "lr at the end of the cosine decay (before batch scaling)")
    lr_scaling: bool = _f(True, "multiply the lrs by global_batch / 256")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-6, "weight decay (none on biases, norms, feature_align)")
    clip_grad: float = _f(1.0, "max gradient norm; 0 disables clipping")
    amp: str = _f("auto", "fp16 mixed precision: auto (on with CUDA) | on | off", choices=["auto", "on", "off"])
    # run
    seed: int = _f(0, "random seed (model init, sample order, permutations, dropout)")
    num_workers: int = _f(2, "DataLoader workers per process")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    output_dir: str = _f("runs/csa", "checkpoint.pth, history.csv/json, curves.png go here")
    resume: str | None = _f(None, "checkpoint to continue from, or 'auto' (<output_dir>/checkpoint.pth if present)")
    save_every: int = _f(0, "also keep checkpoint-epochNNN.pth every N epochs (0: never)")
    progress: bool = _f(True, "tqdm progress bars (rank 0)")

    def check(self) -> None:
        """Raise CSAInputError on inconsistent values."""
        if self.topk < 1 or self.anchor_len < 1:
            raise CSAInputError(f"--topk ({self.topk}) and --anchor-len ({self.anchor_len}) must be >= 1")
        if self.batch_size < 1 or self.num_epochs < 1 or not 0 <= self.warmup_epochs <= self.num_epochs:
            raise CSAInputError("need --batch-size >= 1, --num-epochs >= 1 and 0 <= --warmup-epochs <= --num-epochs")
        if self.stop_at_epoch is not None and not 1 <= self.stop_at_epoch <= self.num_epochs:
            raise CSAInputError(f"--stop-at-epoch must lie in [1, --num-epochs={self.num_epochs}]")
        if self.embed_dim % self.num_heads:
            raise CSAInputError(f"--embed-dim {self.embed_dim} must be divisible by --num-heads {self.num_heads}")
        if not self.feature_names:
            raise CSAInputError("give at least one --feature-names")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag-name`` per :class:`TrainConfig` field (defaults shown)."""
    parser = argparse.ArgumentParser(prog="csa train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kw: dict[str, Any] = {"default": default, "help": f.metadata["help"], "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["nargs"] = "+"
        elif f.name == "stop_at_epoch":
            kw["type"] = int
        elif default is not None:
            kw["type"] = type(default)
        parser.add_argument(flag, **kw)
    return parser


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------
def _setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """Return (rank, world_size, device, initialized_here)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise CSAInputError(f"--device {config.device} but CUDA is not available; use --device cpu")
    if world > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(device)
        initialized = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo", init_method="env://")
            initialized = True
        return rank, world, device, initialized
    device = torch.device(("cuda" if want_cuda else "cpu") if config.device == "auto" else config.device)
    return 0, 1, device, False


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------
# checkpoints and history
# --------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch(obj: Any, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def _write_history(history: list[dict[str, Any]], out: Path) -> None:
    with atomic_write(out / "history.json", "w") as f:
        json.dump(history, f, indent=1)
    with atomic_write(out / "history.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    try:
        from csa.figures import plot_training_curves

        fig = plot_training_curves(history)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        with atomic_write(out / "curves.png", "wb") as f:
            f.write(buf.getvalue())
    except Exception as exc:  # a figure problem must never stop training
        warnings.warn(f"could not draw curves.png: {exc}", stacklevel=2)


def _resolve_resume(config: TrainConfig) -> Path | None:
    if config.resume in (None, "", "None", "none"):
        return None
    if config.resume == "auto":
        path = Path(config.output_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise CSAInputError(f"--resume {path}: no such checkpoint; give the path of a checkpoint.pth written by "
                            f"csa.train, 'auto', or leave --resume out to start from scratch")
    return path


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CSAInputError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); it is truncated or not "
                            f"a csa.train checkpoint") from exc
    missing = [k for k in ("epoch", "state_dict", "optimizer", "schedule") if k not in ckpt]
    if missing:
        raise CSAInputError(f"checkpoint {path} lacks {missing}: it is not a resumable csa.train checkpoint "
                            f"(weights-only checkpoints can be evaluated but not resumed)")
    return ckpt


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train with ``config``; return ``{'history', 'checkpoint', 'output_dir', 'model'}`` (model: the bare,
    trained :class:`~csa.model.RerankTransformer`, on the training device)."""
    config.check()
    rank, world, device, initialized_here = _setup_distributed(config)
    try:
        return _run(config, rank, world, device)
    finally:
        if initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _run(config: TrainConfig, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    main_process = rank == 0
    log = print if main_process else (lambda *a, **k: None)
    amp = device.type == "cuda" and config.amp in ("auto", "on")
    if config.amp == "on" and device.type != "cuda":
        warnings.warn("--amp on needs CUDA; training in float32 on the CPU", stacklevel=2)
    if config.batch_size % world:
        raise CSAInputError(f"--batch-size {config.batch_size} (global) is not divisible by the {world} processes; "
                            f"choose a multiple of {world}")
    out = Path(config.output_dir)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)

    # data: descriptors, clusters, neighbours (rank 0 builds the cache, the others read it)
    clusters = load_clusters(config.data_root, config.trainset, config.split)
    feats = [load_train_features(config.data_root, config.trainset, name, config.split, n_rows=len(clusters))
             for name in config.feature_names]
    cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.data_root) / "cache"
    cache = neighbour_cache_path(cache_dir, config.trainset, config.split, config.topk, config.anchor_len,
                                 config.feature_names)
    table = None
    if main_process:
        table = NeighbourTable(feats, config.topk, config.anchor_len, cache, config.neighbour_chunk, device,
                               progress=config.progress)
        log(f">> neighbour table {'computed and cached' if table.computed else 'read'}: {cache}")
    _barrier(world)
    if table is None:
        table = NeighbourTable(feats, config.topk, config.anchor_len, cache, config.neighbour_chunk, device,
                               progress=False)
    dataset = TrainingSet(table, np.tile(clusters, len(feats)), seed=config.seed, permute=True)
    features = torch.from_numpy(np.concatenate(feats, axis=0)).to(device)
    del feats
    sampler = GlobalBatchSampler(len(dataset), config.batch_size, rank, world, seed=config.seed, shuffle=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                         pin_memory=device.type == "cuda")

    # model, loss, optimizer, schedule
    _seed_all(config.seed)
    model = RerankTransformer(anchor_len=config.anchor_len, embed_dim=config.embed_dim, depth=config.depth,
                              num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                              drop_rate=config.drop_rate, attn_drop_rate=config.attn_drop_rate,
                              drop_path_rate=config.drop_path_rate).to(device)
    criterion = CSACriterion(alpha=config.alpha, temperature=config.temperature)
    scale = config.batch_size / 256 if config.lr_scaling else 1.0
    optimizer = build_optimizer(model, config.base_lr * scale, config.momentum, config.weight_decay)
    schedule = WarmupCosineSchedule(optimizer, config.base_lr * scale, config.warmup_lr * scale,
                                    config.final_lr * scale, config.warmup_epochs, config.num_epochs, len(sampler))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_epoch, history = 0, []
    resume = _resolve_resume(config)
    if resume is not None:
        ckpt = _load_checkpoint(resume)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:
            _set_rng_state(ckpt["rng"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt.get("history", []))
        log(f">> resumed from {resume} at epoch {start_epoch}")
    elif config.resume == "auto":
        log(f">> --resume auto: no {out / CHECKPOINT_NAME} yet, starting from scratch")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    n_params = sum(p.numel() for p in model.parameters())
    log(f">> {len(dataset)} samples ({len(config.feature_names)} feature set(s)), {len(sampler)} iterations/epoch "
        f"of {config.batch_size} ({world} process(es) x {config.batch_size // world}), {n_params / 1e6:.2f}M params, "
        f"device {device}, amp {amp}, lr peak {config.base_lr * scale:.4g}")

    stop = config.stop_at_epoch or config.num_epochs
    for epoch in range(start_epoch, stop):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        torch.manual_seed(_derived_seed(config.seed, 2, epoch, rank))  # dropout: a function of (seed, epoch, rank)
        t0 = time.time()
        stats = train_one_epoch(net, criterion, loader, optimizer, schedule, device, scaler=scaler,
                                clip_grad=config.clip_grad, amp=amp, progress=config.progress and main_process,
                                features=features, desc=f"epoch {epoch + 1}/{config.num_epochs}")
        row = {"epoch": epoch + 1, "lr": stats["lr"], "loss": stats["loss"], "contrastive": stats["contrastive"],
               "reconstruction": stats["reconstruction"], "skipped": stats["skipped"], "time": time.time() - t0}
        history.append(row)
        if main_process:
            ckpt = {"epoch": epoch + 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                    "config": model.config, "train_config": asdict(config), "history": history}
            _save_torch(ckpt, out / CHECKPOINT_NAME)
            if config.save_every and (epoch + 1) % config.save_every == 0:
                _save_torch(ckpt, out / f"checkpoint-epoch{epoch + 1:03d}.pth")
            _write_history(history, out)
            skipped = f"  skipped {row['skipped']}" if row["skipped"] else ""
            log(f">> epoch {epoch + 1}/{config.num_epochs}  lr {row['lr']:.4g}  loss {row['loss']:.4f} "
                f"(contrastive {row['contrastive']:.4f}, reconstruction {row['reconstruction']:.4f})  "
                f"{row['time']:.1f}s{skipped}", flush=True)
        _barrier(world)
    return {"history": history, "checkpoint": out / CHECKPOINT_NAME, "output_dir": out, "model": unwrap(model)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m csa.train``, ``csa train``, ``torchrun -m csa.train``)."""
    args = build_parser().parse_args(argv)
    config = TrainConfig(**vars(args))
    try:
        run_training(config)
    except CSAInputError as exc:
        print(f"csa train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
