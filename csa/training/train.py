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

import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from csa.checkpoint import load_run_checkpoint, save_run_checkpoint
from csa.data.layout import load_clusters, load_train_features
from csa.losses import CSACriterion
from csa.model import RerankTransformer, unwrap
from csa.progress import HEARTBEAT, Heartbeat, is_terminal
from csa.training.config import TrainConfig
from csa.training.distributed import Processes, barrier, setup_processes, teardown_processes
from csa.training.engine import StepOptions, WarmupCosineSchedule, build_optimizer, train_one_epoch
from csa.training.recipes import effective_lrs
from csa.training.rng import derived_seed, rng_state, seed_all, set_rng_state
from csa.training.run_folder import (CHECKPOINT_NAME, CURVES_EVERY_S, HISTORY_COLUMNS, RESUME_FIXED,
                                     check_resume_matches, neighbour_cache, prepare_output_dir, resolve_resume,
                                     write_history)
from csa.training.sampler import GlobalBatchSampler, NeighbourTable, TrainingSet, stacked_clusters
from csa.validation import CSAInputError, check_rows

__all__ = ["run_training", "build_optimization", "epoch_line_due", "CHECKPOINT_NAME", "HISTORY_COLUMNS",
           "RESUME_FIXED"]


@dataclass
class _Data:
    """What the epochs iterate: the samples, their order, the batches, and the descriptors on the device."""

    dataset: TrainingSet
    sampler: GlobalBatchSampler
    loader: torch.utils.data.DataLoader
    features: torch.Tensor


@dataclass
class _State:
    """What a checkpoint stores and ``--resume`` restores."""

    model: RerankTransformer
    optimizer: torch.optim.SGD
    schedule: WarmupCosineSchedule
    scaler: torch.amp.GradScaler
    history: list[dict[str, Any]]


def _load_training_features(config: TrainConfig, n_rows: int) -> list[np.ndarray]:
    """Every feature set of the run: finite rows (renormalized with a warning when not unit-norm)."""
    feats = []
    for name in config.feature_names:
        x = load_train_features(config.data_root, config.trainset, name, config.split, n_rows=n_rows)
        feats.append(check_rows(x, f"training features '{name}' of '{config.trainset}' (split '{config.split}')"))
    return feats


def _training_data(config: TrainConfig, procs: Processes, out: Path, log: Callable[..., None]) -> _Data:
    """Descriptors, clusters and the neighbour table (rank 0 builds the cache, the others read it), the
    samples and their global batches."""
    clusters = load_clusters(config.data_root, config.trainset, config.split)
    feats = _load_training_features(config, len(clusters))
    cache = neighbour_cache(config, out)
    table = None
    if procs.main:
        table = NeighbourTable(feats, config.topk, config.anchor_len, cache, config.neighbour_chunk, procs.device,
                               progress=config.progress)
        log(f">> neighbour table {'computed and cached' if table.computed else 'read'}: {cache}")
    barrier(procs.world)
    if table is None:
        table = NeighbourTable(feats, config.topk, config.anchor_len, cache, config.neighbour_chunk, procs.device,
                               progress=False)
    dataset = TrainingSet(table, stacked_clusters(clusters, len(feats)), seed=config.seed, permute=True,
                          samples=config.samples)
    features = torch.from_numpy(np.concatenate(feats, axis=0)).to(procs.device)
    sampler = GlobalBatchSampler(len(dataset), config.batch_size, procs.rank, procs.world, seed=config.seed,
                                 order=config.sample_order, reference_gpus=config.reference_gpus)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                         pin_memory=procs.device.type == "cuda")
    return _Data(dataset, sampler, loader, features)


def build_optimization(config: TrainConfig, model: torch.nn.Module,
                       iters_per_epoch: int) -> tuple[torch.optim.SGD, WarmupCosineSchedule]:
    """The SGD optimizer and the per-iteration schedule of ``config`` (lrs scaled as its recipe says)."""
    lrs = effective_lrs(asdict(config))
    optimizer = build_optimizer(model, lrs["peak_lr"], config.momentum, config.weight_decay,
                                feature_align_decay=config.feature_align_decay)
    schedule = WarmupCosineSchedule(optimizer, lrs["peak_lr"], lrs["warmup_lr"], lrs["final_lr"],
                                    config.warmup_epochs, config.num_epochs, iters_per_epoch)
    return optimizer, schedule


def _new_state(config: TrainConfig, device: torch.device, iters_per_epoch: int, amp: bool) -> _State:
    """A freshly initialized model (seeded with ``config.seed``), its optimizer, schedule and scaler."""
    seed_all(config.seed)
    model = RerankTransformer(anchor_len=config.anchor_len, embed_dim=config.embed_dim, depth=config.depth,
                              num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                              drop_rate=config.drop_rate, attn_drop_rate=config.attn_drop_rate,
                              drop_path_rate=config.drop_path_rate).to(device)
    optimizer, schedule = build_optimization(config, model, iters_per_epoch)
    return _State(model, optimizer, schedule, torch.amp.GradScaler("cuda", enabled=amp), [])


def _restore(state: _State, ckpt: dict[str, Any]) -> int:
    """Load a run checkpoint into ``state`` (weights, optimizer, schedule, scaler, RNG, history); return its epoch."""
    state.model.load_state_dict(ckpt["state_dict"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.schedule.load_state_dict(ckpt["schedule"])
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    state.history = list(ckpt.get("history", []))
    return int(ckpt["epoch"])


def _save_epoch(config: TrainConfig, out: Path, state: _State, epoch: int) -> None:
    """Rank 0 after ``epoch`` (1-based): the resumable checkpoint, the per-epoch copy every ``--save-every``."""
    extra = {"optimizer": state.optimizer.state_dict(), "schedule": state.schedule.state_dict(),
             "scaler": state.scaler.state_dict(), "rng": rng_state(), "train_config": asdict(config),
             "history": state.history}
    save_run_checkpoint(out / CHECKPOINT_NAME, state.model, epoch, **extra)
    if config.save_every and epoch % config.save_every == 0:
        save_run_checkpoint(out / f"checkpoint-epoch{epoch:03d}.pth", state.model, epoch, **extra)


def epoch_line_due(epoch: int, first: int, last: int, terminal: bool, heartbeat: Heartbeat) -> bool:
    """Whether epoch ``epoch`` (1-based) of a run over ``first``..``last`` prints its line: every epoch on a
    terminal; in a log (papermill, a pipe) the first, the last and one every ~25 s (the full history is
    in ``history.csv``), so a long run still says something at least every ~30 s."""
    if terminal:
        return True
    due = heartbeat.due()   # always asked, so its clock runs from the start of training
    if epoch in (first, last) or due:
        heartbeat.beat()
        return True
    return False


def _log_epoch(log: Callable[..., None], row: dict[str, Any], num_epochs: int) -> None:
    skipped = f"  skipped {row['skipped']}" if row["skipped"] else ""
    log(f">> epoch {row['epoch']}/{num_epochs}  lr {row['lr']:.4g}  loss {row['loss']:.4f} "
        f"(contrastive {row['contrastive']:.4f}, reconstruction {row['reconstruction']:.4f})  "
        f"{row['time']:.1f}s{skipped}", flush=True)


def _use_amp(config: TrainConfig, device: torch.device) -> bool:
    """Mixed precision on CUDA (``--amp auto|on``); ``--amp on`` on the CPU warns and trains in float32."""
    if config.amp == "on" and device.type != "cuda":
        warnings.warn("--amp on needs CUDA; training in float32 on the CPU", stacklevel=3)
    return device.type == "cuda" and config.amp in ("auto", "on")


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train with ``config``; return ``{'history', 'checkpoint', 'output_dir', 'model'}`` (model: the bare,
    trained :class:`~csa.model.RerankTransformer`, on the training device)."""
    config.check()
    procs = setup_processes(config.device)
    try:
        return _train(config, procs)
    finally:
        teardown_processes(procs)


def _train(config: TrainConfig, procs: Processes) -> dict[str, Any]:
    """Load, build or resume, then one epoch after another; rank 0 saves and logs after each."""
    log = print if procs.main else (lambda *a, **k: None)
    amp = _use_amp(config, procs.device)
    if config.batch_size % procs.world:
        raise CSAInputError(f"--batch-size {config.batch_size} (global) is not divisible by the {procs.world} "
                            f"processes; choose a multiple of {procs.world}")
    resume = resolve_resume(config)
    out = prepare_output_dir(config, resume is not None, procs.main)
    ckpt = load_run_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        check_resume_matches(ckpt, config, resume)
    data = _training_data(config, procs, out, log)
    state = _new_state(config, procs.device, len(data.sampler), amp)
    start_epoch = _restore(state, ckpt) if ckpt is not None else 0
    if ckpt is not None:
        log(f">> resumed from {resume} at epoch {start_epoch}")
    elif config.resume == "auto":
        log(f">> --resume auto: no {out / CHECKPOINT_NAME} yet, starting from scratch")
    net = state.model if procs.world == 1 else torch.nn.parallel.DistributedDataParallel(
        state.model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    log(f">> {len(data.dataset)} samples ({len(config.feature_names)} feature set(s)), {len(data.sampler)} "
        f"iterations/epoch of {config.batch_size} ({procs.world} process(es) x {config.batch_size // procs.world}), "
        f"{sum(p.numel() for p in state.model.parameters()) / 1e6:.2f}M params, device {procs.device}, amp {amp}, "
        f"recipe {config.recipe}, lr {state.schedule.warmup_lr:.4g} -> {state.schedule.base_lr:.4g}")
    criterion = CSACriterion(alpha=config.alpha, temperature=config.temperature)
    options = StepOptions(scaler=state.scaler, clip_grad=config.clip_grad, amp=amp, fp16_inputs=config.fp16_inputs)
    stop = config.stop_at_epoch or config.num_epochs
    terminal = is_terminal(sys.stdout)
    curves_drawn = time.time()
    for epoch in range(start_epoch, stop):
        data.sampler.set_epoch(epoch)
        data.dataset.set_epoch(epoch)
        torch.manual_seed(derived_seed(config.seed, 2, epoch, procs.rank))  # dropout: a function of (seed, epoch, rank)
        t0 = time.time()
        stats = train_one_epoch(net, criterion, data.loader, state.optimizer, state.schedule, procs.device, options,
                                features=data.features, progress=config.progress and procs.main,
                                desc=f"epoch {epoch + 1}/{config.num_epochs}")
        state.history.append({"epoch": epoch + 1, **{k: stats[k] for k in HISTORY_COLUMNS[1:-1]},
                              "time": time.time() - t0})
        if procs.main:
            _save_epoch(config, out, state, epoch + 1)
            draw = epoch + 1 == stop or time.time() - curves_drawn >= CURVES_EVERY_S
            write_history(state.history, out, draw=draw)
            curves_drawn = time.time() if draw else curves_drawn
            if epoch_line_due(epoch + 1, start_epoch + 1, stop, terminal, HEARTBEAT):
                _log_epoch(log, state.history[-1], config.num_epochs)
        barrier(procs.world)
    return {"history": state.history, "checkpoint": out / CHECKPOINT_NAME, "output_dir": out,
            "model": unwrap(state.model)}

