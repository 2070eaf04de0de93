"""Training engine: optimizer, learning-rate schedule and one training epoch."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from csa.affinity import indexed_affinity
from csa.model import unwrap
from csa.progress import progress_bar
from csa.validation import CSAError, CSAInputError

__all__ = ["build_optimizer", "WarmupCosineSchedule", "StepOptions", "train_one_epoch", "NonFiniteLossError",
           "MAX_NONFINITE_STREAK"]

#: Consecutive iterations with a non-finite loss after which training stops with an error.
MAX_NONFINITE_STREAK = 10


class NonFiniteLossError(CSAError, RuntimeError):
    """Training produced a run of non-finite losses: it is learning nothing, so it stops."""


def _skips_decay(name: str, param: torch.Tensor, prefixes: Iterable[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(name == p or name.startswith(p + ".") for p in prefixes)


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                    feature_align_decay: bool = False) -> torch.optim.SGD:
    """SGD with two parameter groups: ``no_decay`` (biases, 1-D parameters such as LayerNorm, and the
    prefixes of ``model.no_weight_decay()``, i.e. ``feature_align``) and ``decay`` (the rest).

    The official helper compared full parameter names with the set {'feature_align'}, which matches
    no parameter, so there ``feature_align.layers.0.weight`` was decayed: ``feature_align_decay=True``
    (the ``official`` recipe) does the same; by default prefixes match, as the code meant.
    """
    model = unwrap(model)
    prefixes = () if feature_align_decay else (
        tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _skips_decay(name, p, prefixes) else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay"},
              {"params": decay, "weight_decay": float(weight_decay), "group_name": "decay"}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


class WarmupCosineSchedule:
    """Per-iteration learning rate: linear warm-up, then cosine decay (the official schedule).

    With W = warmup_epochs * iters_per_epoch and T = num_epochs * iters_per_epoch, iteration t gets
    ``warmup_lr + (base_lr - warmup_lr) * t / (W - 1)`` for t < W (numpy ``linspace``: the last
    warm-up iteration reaches base_lr), then
    ``final_lr + (base_lr - final_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2`` for W <= t < T,
    and ``final_lr`` from T on (the official code raised IndexError on its very last iteration).
    :meth:`step` sets the lr of the current iteration on the optimizer, then advances.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, base_lr: float, warmup_lr: float, final_lr: float,
                 warmup_epochs: int, num_epochs: int, iters_per_epoch: int) -> None:
        if iters_per_epoch < 1 or num_epochs < 1 or not 0 <= warmup_epochs <= num_epochs:
            raise CSAInputError(f"need iters_per_epoch >= 1, num_epochs >= 1 and 0 <= warmup_epochs <= num_epochs; "
                                f"got {iters_per_epoch}, {num_epochs}, {warmup_epochs}")
        self.optimizer = optimizer
        self.base_lr, self.warmup_lr, self.final_lr = float(base_lr), float(warmup_lr), float(final_lr)
        self.iters_per_epoch = int(iters_per_epoch)
        self.warmup_iters = int(warmup_epochs) * self.iters_per_epoch
        self.total_iters = int(num_epochs) * self.iters_per_epoch
        self.iteration = 0

    def lr_at(self, t: int) -> float:
        """Learning rate of (0-based) iteration ``t``."""
        w, total = self.warmup_iters, self.total_iters
        if t < w:
            return self.warmup_lr if w == 1 else self.warmup_lr + (self.base_lr - self.warmup_lr) * t / (w - 1)
        if t < total:
            return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1.0 + math.cos(math.pi * (t - w) / (total - w)))
        return self.final_lr

    def step(self) -> float:
        """Apply the current iteration's lr to every parameter group, advance, and return that lr."""
        lr = self.lr_at(self.iteration)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.iteration += 1
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "base_lr": self.base_lr, "warmup_lr": self.warmup_lr,
                "final_lr": self.final_lr, "warmup_iters": self.warmup_iters, "total_iters": self.total_iters,
                "iters_per_epoch": self.iters_per_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        changed = [k for k in mine if k != "iteration" and k in state and not math.isclose(mine[k], state[k])]
        if changed:
            warnings.warn(f"resumed schedule differs in {changed} (checkpoint: "
                          f"{ {k: state[k] for k in changed} }); keeping the new values", stacklevel=2)
        self.iteration = int(state["iteration"])


def _stop_non_finite(desc: str, count: int, loss: torch.Tensor) -> None:
    raise NonFiniteLossError(
        f"{desc}: the loss was not finite in {count} iterations in a row (last: {float(loss.detach()):.4g}); "
        f"training is learning nothing — lower --base-lr / --warmup-lr, keep --clip-grad on, or check the "
        f"training features. The last saved checkpoint is kept")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class StepOptions:
    """How each optimization step of :func:`train_one_epoch` runs.

    ``amp`` runs the model under autocast to ``amp_dtype``: float16 (CUDA only, with the ``scaler``) or
    bfloat16 (CUDA or CPU; the losses stay float32, no scaler needed); ``clip_grad`` > 0 clips the global
    gradient norm; ``fp16_inputs`` rounds the affinities to float16 first (as the official code does).
    """

    scaler: torch.amp.GradScaler | None = None
    clip_grad: float = 1.0
    amp: bool = False
    amp_dtype: torch.dtype = torch.float16
    fp16_inputs: bool = False


def _step_options(options: StepOptions | None, keywords: dict[str, Any]) -> StepOptions:
    """``options``, or a :class:`StepOptions` built from its fields given as keywords (not both)."""
    if options is not None and keywords:
        raise CSAInputError(f"give train_one_epoch either options=StepOptions(...) or its fields as keywords "
                            f"({sorted(keywords)}), not both")
    unknown = sorted(set(keywords) - set(StepOptions.__dataclass_fields__))
    if unknown:
        raise CSAInputError(f"train_one_epoch got unknown keyword(s) {unknown}; the step options are "
                            f"{sorted(StepOptions.__dataclass_fields__)}")
    return options if options is not None else StepOptions(**keywords)


def _batch_inputs(batch: Mapping[str, torch.Tensor], features: torch.Tensor | None, device: torch.device,
                  fp16_inputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's float32 affinities (B, K+1, L) (built from ``features`` unless the batch carries them) and
    its targets, on ``device``."""
    targets = batch["targets"].to(device, non_blocking=True)
    if "affinity" in batch:
        affinity = batch["affinity"].to(device, non_blocking=True)
    else:
        if features is None:
            raise CSAInputError("train_one_epoch needs features=(N, D) tensor to build affinities from indices")
        affinity = indexed_affinity(features, batch["tokens"], batch["anchors"])
    return (affinity.half().float() if fp16_inputs else affinity.float()), targets


def _finite_on_every_process(loss: torch.Tensor, distributed: bool) -> bool:
    finite = torch.isfinite(loss).to(torch.int32)
    if distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _optimizer_step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                    options: StepOptions) -> None:
    """Backward, optional gradient clipping, and the update (through the scaler when it is enabled)."""
    optimizer.zero_grad(set_to_none=True)
    scaler = options.scaler
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if options.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if options.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad)
        optimizer.step()


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, schedule: WarmupCosineSchedule | None,
                    device: str | torch.device, options: StepOptions | None = None, *,
                    features: torch.Tensor | None = None, progress: bool = True, desc: str = "train",
                    **step_options: Any) -> dict[str, float]:
    """One pass over ``loader``; returns the mean ``loss``, ``contrastive`` and ``reconstruction`` over the
    finite iterations (averaged over processes under torch.distributed), plus ``lr`` (last),
    ``iterations`` and ``skipped``.

    Batches are dicts from :class:`csa.training.sampler.TrainingSet` (``tokens``, ``anchors``, ``targets``),
    turned into affinities on ``device`` by :func:`csa.affinity.indexed_affinity` with ``features`` (N, D) already
    on the device; a batch may also carry a ready ``affinity`` (B, K+1, L).  ``options``
    (:class:`StepOptions`: scaler, clip_grad, amp, amp_dtype, fp16_inputs) say how each step runs; its
    fields may be given as keywords instead.
    A non-finite loss skips the update (on every process), warns and is counted; the
    schedule still advances so the lr stays a function of the iteration number.  After
    :data:`MAX_NONFINITE_STREAK` such iterations in a row, or an epoch without a finite one,
    :class:`NonFiniteLossError` stops the run (skipped iterations change no weight, so the last
    checkpoint stays valid).
    """
    options = _step_options(options, step_options)
    device = torch.device(device)
    amp = bool(options.amp) and (device.type == "cuda" or options.amp_dtype == torch.bfloat16)
    distributed = _distributed()
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    n_ok, n_skipped, streak, lr = 0, 0, 0, float("nan")
    bar = progress_bar(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for it, batch in enumerate(bar):
        lr = schedule.step() if schedule is not None else optimizer.param_groups[0]["lr"]
        affinity, targets = _batch_inputs(batch, features, device, options.fp16_inputs)
        with torch.autocast(device_type=device.type, dtype=options.amp_dtype, enabled=amp):
            tokens, reconstruction = model(affinity)
            losses = criterion(tokens, reconstruction, affinity, targets)
        loss = losses["loss"]
        if not _finite_on_every_process(loss, distributed):
            n_skipped += 1
            streak += 1
            if streak >= MAX_NONFINITE_STREAK:
                _stop_non_finite(desc, streak, loss)
            warnings.warn(f"{desc}: non-finite loss at iteration {it} (loss={float(loss.detach()):.4g}); skipping the update "
                          f"({n_skipped} skipped so far)", RuntimeWarning, stacklevel=2)
            optimizer.zero_grad(set_to_none=True)
            continue
        streak = 0
        _optimizer_step(model, loss, optimizer, options)
        sums += torch.stack([losses[k].detach().double() for k in ("loss", "contrastive", "reconstruction")])
        n_ok += 1
        if progress and (it % 10 == 0):
            bar.set_postfix(loss=f"{float(losses['loss'].detach()):.4f}", lr=f"{lr:.3g}")
    bar.close()
    if n_skipped and not n_ok:  # a whole (short) epoch without one finite loss
        _stop_non_finite(desc, n_skipped, loss)
    if distributed:
        dist.all_reduce(sums)
        sums /= dist.get_world_size()
    means = (sums / max(n_ok, 1)).tolist() if n_ok else [float("nan")] * 3
    return {"loss": means[0], "contrastive": means[1], "reconstruction": means[2], "lr": lr,
            "iterations": n_ok + n_skipped, "skipped": n_skipped}
