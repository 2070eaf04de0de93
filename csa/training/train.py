"""Train a CSA re-ranker: ``csa train ...``, ``python -m csa.training ...`` or
``torchrun --nproc_per_node=N -m csa.training ...``.

Every training image is a query; its self + top-K neighbours (rows, 1..K shuffled per sample) and
self + top L-1 neighbours (anchors) give a (K+1, L) affinity matrix built per batch on the device.
The hyper-parameters come from a named recipe (``--recipe paper|official|demo``, see
:mod:`csa.training.recipes`; flags override single fields); ``--dry-run`` prints the resolved
configuration.  Whatever the recipe:

* The global batch is the same for any number of processes (split B / world per rank) and the row
  permutations are functions of (seed, epoch, sample): one process and N processes see the same
  batches.  (The ``official`` recipe's learning rates and sample order are those of the public code
  *on 4 GPUs*, whatever number of processes runs it.)
* Tokens are the query + K neighbours (K+1 rows, as at test time); the official ``--topk`` counted
  the query, so its recipe uses K = 511.
* A non-finite loss skips the update on every process and the schedule still advances (the public
  code stepped the scaler and left the schedule behind); the official scheduler's IndexError on the
  last iteration is not reproduced.
* Checkpoints hold the optimizer, schedule, scaler and RNG states, and ``--resume`` continues
  exactly; files are written atomically.

Safety: every hyper-parameter is checked before anything is loaded
(:func:`csa.training.config.check_hyperparameters`); ``--output-dir`` must be writable and must not
hold another run unless ``--resume`` (which refuses a stored config that differs in a field that
changes the model or the data, :data:`RESUME_FIXED`) or ``--overwrite`` is given; training
features must be finite (rows that are not unit-norm are renormalized with a warning, as test
features are); a run of non-finite losses stops the run with an error instead of skipping
updates forever; a model whose weights stopped being finite is never saved.
"""
from __future__ import annotations

import csv
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
from csa.fileio import atomic_write, check_output_dir, remove_stale_temporaries, save_figure
from csa.losses import CSACriterion
from csa.model import RerankTransformer, unwrap
from csa.training.config import TrainConfig, config_from_argv, option_flag, resume_given
from csa.training.recipes import effective_lrs
from csa.training.engine import WarmupCosineSchedule, build_optimizer, train_one_epoch
from csa.training.sampler import stacked_clusters, GlobalBatchSampler, NeighbourTable, TrainingSet, neighbour_cache_path
from csa.validation import CSAInputError, check_rows, run_command

__all__ = ["main", "run_training", "build_optimization", "CHECKPOINT_NAME", "HISTORY_COLUMNS", "RESUME_FIXED"]

CHECKPOINT_NAME = "checkpoint.pth"
HISTORY_COLUMNS = ["epoch", "lr", "loss", "contrastive", "reconstruction", "skipped", "time"]
#: Config fields that ``--resume`` must find unchanged: they define the model or the data it sees.
RESUME_FIXED = ("trainset", "split", "feature_names", "topk", "anchor_len", "embed_dim", "depth", "num_heads",
                "mlp_ratio", "qkv_bias", "batch_size", "seed")


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


#: ``curves.png`` is redrawn at most this often (seconds) during a run, and always after the last epoch.
CURVES_EVERY_S = 60.0


def _write_history(history: list[dict[str, Any]], out: Path, draw: bool = True) -> None:
    with atomic_write(out / "history.json", "w") as f:
        json.dump(history, f, indent=1)
    with atomic_write(out / "history.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    if not draw:
        return
    try:
        from csa.training.curves import plot_training_curves

        save_figure(plot_training_curves(history), out / "curves.png", dpi=110)
    except Exception as exc:  # a figure problem must never stop training
        warnings.warn(f"could not draw curves.png: {exc}", stacklevel=2)


def _resolve_resume(config: TrainConfig) -> Path | None:
    if not resume_given(config.resume):
        return None
    if config.resume == "auto":
        path = Path(config.output_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise CSAInputError(f"--resume {path}: no such checkpoint; give the path of a checkpoint.pth written by "
                            f"csa train, 'auto', or leave --resume out to start from scratch")
    return path


def _check_output_dir(config: TrainConfig, resuming: bool, main_process: bool) -> Path:
    """``--output-dir`` before any work: writable, and not holding another run unless resuming or
    ``--overwrite``.  Rank 0 then clears what an interrupted run left (temporary files) and, with
    ``--overwrite``, the old run's per-epoch checkpoints."""
    out = Path(config.output_dir)
    existing = out / CHECKPOINT_NAME
    if existing.is_file() and not resuming and not config.overwrite:
        raise CSAInputError(f"--output-dir {out} already holds a training run ({existing}); continue it with "
                            f"--resume auto, replace it with --overwrite, or choose another --output-dir")
    if main_process:
        check_output_dir(out, "--output-dir")
        remove_stale_temporaries(out)
        if config.overwrite:
            for stale in out.glob("checkpoint-epoch*.pth"):
                stale.unlink()
    return out


def _check_resume_matches(ckpt: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse to resume ``ckpt`` with a config that changes the model or the data (:data:`RESUME_FIXED`)."""
    stored = ckpt.get("train_config") or {}
    current = asdict(config)
    changed = [f for f in RESUME_FIXED if f in stored and stored[f] != current[f]]
    if changed:
        diff = ", ".join(f"{option_flag(f)} {stored[f]!r} -> {current[f]!r}" for f in changed)
        raise CSAInputError(f"--resume {path}: the run was trained with other settings ({diff}); resuming would "
                            f"continue a different model or data. Use the stored values, or start a new run "
                            f"(another --output-dir, or --overwrite)")


def _neighbour_cache(config: TrainConfig, out: Path) -> Path:
    """Cache file of the neighbour table: under ``--cache-dir`` (default ``<data_root>/cache``); when the
    default is read-only and holds no table yet, under ``<output_dir>/cache`` (with a warning)."""
    def cache_in(folder: Path) -> Path:
        return neighbour_cache_path(folder, config.trainset, config.split, config.topk, config.anchor_len,
                                    config.feature_names)

    folder = Path(config.cache_dir) if config.cache_dir else Path(config.data_root) / "cache"
    if cache_in(folder).is_file():
        return cache_in(folder)
    try:
        check_output_dir(folder, "--cache-dir")
    except CSAInputError:
        if config.cache_dir:
            raise
        warnings.warn(f"{folder} cannot be written (read-only data root?): the neighbour table is cached in "
                      f"{out / 'cache'} instead; choose the place with --cache-dir", stacklevel=2)
        return cache_in(out / "cache")
    return cache_in(folder)


def _load_training_features(config: TrainConfig, n_rows: int) -> list[np.ndarray]:
    """Every feature set of the run: finite rows (renormalized with a warning when not unit-norm)."""
    feats = []
    for name in config.feature_names:
        x = load_train_features(config.data_root, config.trainset, name, config.split, n_rows=n_rows)
        feats.append(check_rows(x, f"training features '{name}' of '{config.trainset}' (split '{config.split}')"))
    return feats


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def build_optimization(config: TrainConfig, model: torch.nn.Module,
                       iters_per_epoch: int) -> tuple[torch.optim.SGD, WarmupCosineSchedule]:
    """The SGD optimizer and the per-iteration schedule of ``config`` (lrs scaled as its recipe says)."""
    lrs = effective_lrs(asdict(config))
    optimizer = build_optimizer(model, lrs["peak_lr"], config.momentum, config.weight_decay,
                                feature_align_decay=config.feature_align_decay)
    schedule = WarmupCosineSchedule(optimizer, lrs["peak_lr"], lrs["warmup_lr"], lrs["final_lr"],
                                    config.warmup_epochs, config.num_epochs, iters_per_epoch)
    return optimizer, schedule


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
    resume = _resolve_resume(config)
    out = _check_output_dir(config, resume is not None, main_process)
    ckpt = load_run_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        _check_resume_matches(ckpt, config, resume)

    # data: descriptors, clusters, neighbours (rank 0 builds the cache, the others read it)
    clusters = load_clusters(config.data_root, config.trainset, config.split)
    feats = _load_training_features(config, len(clusters))
    cache = _neighbour_cache(config, out)
    table = None
    if main_process:
        table = NeighbourTable(feats, config.topk, config.anchor_len, cache, config.neighbour_chunk, device,
                               progress=config.progress)
        log(f">> neighbour table {'computed and cached' if table.computed else 'read'}: {cache}")
    _barrier(world)
    if table is None:
        table = NeighbourTable(feats, config.topk, config.anchor_len, cache, config.neighbour_chunk, device,
                               progress=False)
    dataset = TrainingSet(table, stacked_clusters(clusters, len(feats)), seed=config.seed, permute=True,
                          samples=config.samples)
    features = torch.from_numpy(np.concatenate(feats, axis=0)).to(device)
    del feats
    sampler = GlobalBatchSampler(len(dataset), config.batch_size, rank, world, seed=config.seed,
                                 order=config.sample_order, reference_gpus=config.reference_gpus)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                         pin_memory=device.type == "cuda")

    # model, loss, optimizer, schedule
    _seed_all(config.seed)
    model = RerankTransformer(anchor_len=config.anchor_len, embed_dim=config.embed_dim, depth=config.depth,
                              num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                              drop_rate=config.drop_rate, attn_drop_rate=config.attn_drop_rate,
                              drop_path_rate=config.drop_path_rate).to(device)
    criterion = CSACriterion(alpha=config.alpha, temperature=config.temperature)
    optimizer, schedule = build_optimization(config, model, len(sampler))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_epoch, history = 0, []
    if ckpt is not None:
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
        f"device {device}, amp {amp}, recipe {config.recipe}, lr {schedule.warmup_lr:.4g} -> {schedule.base_lr:.4g}")

    stop = config.stop_at_epoch or config.num_epochs
    curves_drawn = time.time()
    for epoch in range(start_epoch, stop):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        torch.manual_seed(_derived_seed(config.seed, 2, epoch, rank))  # dropout: a function of (seed, epoch, rank)
        t0 = time.time()
        stats = train_one_epoch(net, criterion, loader, optimizer, schedule, device, scaler=scaler,
                                clip_grad=config.clip_grad, amp=amp, progress=config.progress and main_process,
                                fp16_inputs=config.fp16_inputs,
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
            last = epoch + 1 == stop
            draw = last or time.time() - curves_drawn >= CURVES_EVERY_S
            _write_history(history, out, draw=draw)
            curves_drawn = time.time() if draw else curves_drawn
            skipped = f"  skipped {row['skipped']}" if row["skipped"] else ""
            log(f">> epoch {epoch + 1}/{config.num_epochs}  lr {row['lr']:.4g}  loss {row['loss']:.4f} "
                f"(contrastive {row['contrastive']:.4f}, reconstruction {row['reconstruction']:.4f})  "
                f"{row['time']:.1f}s{skipped}", flush=True)
        _barrier(world)
    return {"history": history, "checkpoint": out / CHECKPOINT_NAME, "output_dir": out, "model": unwrap(model)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``csa train``, ``python -m csa.training``, ``torchrun -m csa.training``)."""
    def train() -> int:
        config, dry_run = config_from_argv(argv)
        if dry_run:
            config.check()
            print(json.dumps({"config": asdict(config), "overrides": config.recipe_overrides(),
                              "effective_lrs": effective_lrs(asdict(config))}, indent=1))
            return 0
        run_training(config)
        return 0

    return run_command("csa train", train)


if __name__ == "__main__":
    sys.exit(main())
