"""Train a CSA re-ranker: ``csa train ...``, ``python -m csa.training ...`` or
``torchrun --nproc_per_node=N -m csa.training ...``.

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

import csv
import io
import json
import os
import random
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from csa.checkpoint import load_run_checkpoint, save_run_checkpoint
from csa.data.layout import load_clusters, load_train_features
from csa.fileio import atomic_write
from csa.losses import CSACriterion
from csa.model import RerankTransformer, unwrap
from csa.training.config import TrainConfig, build_parser
from csa.training.engine import WarmupCosineSchedule, build_optimizer, train_one_epoch
from csa.training.sampler import GlobalBatchSampler, NeighbourTable, TrainingSet, neighbour_cache_path
from csa.validation import CSAInputError

__all__ = ["main", "run_training", "CHECKPOINT_NAME", "HISTORY_COLUMNS"]

CHECKPOINT_NAME = "checkpoint.pth"
HISTORY_COLUMNS = ["epoch", "lr", "loss", "contrastive", "reconstruction", "skipped", "time"]


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


def _write_history(history: list[dict[str, Any]], out: Path) -> None:
    with atomic_write(out / "history.json", "w") as f:
        json.dump(history, f, indent=1)
    with atomic_write(out / "history.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    try:
        from csa.training.curves import plot_training_curves

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
                            f"csa train, 'auto', or leave --resume out to start from scratch")
    return path


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train with ``config``; return ``{'history', 'checkpoint', 'output_dir', 'model'}`` (model: the bare,
    trained :class:`~csa.model.RerankTransformer`, on the training device)."""
    config.check()
    rank, world, device, initialized_here = _setup_distributed(config)
    try:
        return _train(config, rank, world, device)
    finally:
        if initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: int, world: int, device: torch.device) -> dict[str, Any]:
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
        ckpt = load_run_checkpoint(resume)
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
            state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "scaler": scaler.state_dict(), "rng": _rng_state(), "train_config": asdict(config),
                     "history": history}
            save_run_checkpoint(out / CHECKPOINT_NAME, model, epoch + 1, **state)
            if config.save_every and (epoch + 1) % config.save_every == 0:
                save_run_checkpoint(out / f"checkpoint-epoch{epoch + 1:03d}.pth", model, epoch + 1, **state)
            _write_history(history, out)
            skipped = f"  skipped {row['skipped']}" if row["skipped"] else ""
            log(f">> epoch {epoch + 1}/{config.num_epochs}  lr {row['lr']:.4g}  loss {row['loss']:.4f} "
                f"(contrastive {row['contrastive']:.4f}, reconstruction {row['reconstruction']:.4f})  "
                f"{row['time']:.1f}s{skipped}", flush=True)
        _barrier(world)
    return {"history": history, "checkpoint": out / CHECKPOINT_NAME, "output_dir": out, "model": unwrap(model)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``csa train``, ``python -m csa.training``, ``torchrun -m csa.training``)."""
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
