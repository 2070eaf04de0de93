"""Training configuration: every hyper-parameter of a run, as a dataclass and as command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from csa.validation import CSAInputError

__all__ = ["TrainConfig", "build_parser", "config_to_argv"]


def _option(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every hyper-parameter of a training run; defaults are the paper's recipe."""

    # data
    data_root: str = _option("data", "data root (annotations/, train/, cache/ inside)")
    trainset: str = _option("retrieval-SfM-120k", "training set name (annotations/<trainset>.pkl)")
    feature_names: list[str] = _option(["gl18-tl-resnet101-gem-w"], "feature sets; several = the paper's augmentation "
                                  "(e.g. gl18-tl-resnet50-gem-w gl18-tl-resnet101-gem-w gl18-tl-resnet152-gem-w)")
    split: str = _option("train", "annotation split used for training")
    cache_dir: str | None = _option(None, "neighbour-table cache folder (default: <data_root>/cache)")
    neighbour_chunk: int = _option(1024, "queries per chunk when computing the neighbour table")
    # model
    topk: int = _option(512, "K: neighbours per sample (tokens = query + K)")
    anchor_len: int = _option(512, "L: anchors (query + L-1 neighbours)")
    embed_dim: int = _option(768, "C: token dimension")
    depth: int = _option(2, "transformer blocks")
    num_heads: int = _option(12, "attention heads")
    mlp_ratio: float = _option(4.0, "MLP hidden size / C")
    qkv_bias: bool = _option(True, "bias in the qkv projection")
    drop_rate: float = _option(0.1, "dropout")
    attn_drop_rate: float = _option(0.1, "attention dropout")
    drop_path_rate: float = _option(0.1, "stochastic depth (drop-path) rate of the last block")
    # loss
    alpha: float = _option(0.2, "weight of the reconstruction loss")
    temperature: float = _option(2.0, "temperature t of the contrastive loss")
    # optimisation
    batch_size: int = _option(256, "GLOBAL batch size (split evenly over processes)")
    num_epochs: int = _option(100, "epochs of the schedule")
    stop_at_epoch: int | None = _option(None, "stop after this epoch (the schedule still spans --num-epochs)")
    warmup_epochs: int = _option(20, "linear warm-up epochs")
    warmup_lr: float = _option(0.001, "lr at the start of warm-up (before batch scaling)")
    base_lr: float = _option(0.1, "lr at the end of warm-up (before batch scaling)")
    final_lr: float = _option(0.0, "lr at the end of the cosine decay (before batch scaling)")
    lr_scaling: bool = _option(True, "multiply the lrs by global_batch / 256")
    momentum: float = _option(0.9, "SGD momentum")
    weight_decay: float = _option(1e-6, "weight decay (none on biases, norms, feature_align)")
    clip_grad: float = _option(1.0, "max gradient norm; 0 disables clipping")
    amp: str = _option("auto", "fp16 mixed precision: auto (on with CUDA) | on | off", choices=["auto", "on", "off"])
    # run
    seed: int = _option(0, "random seed (model init, sample order, permutations, dropout)")
    num_workers: int = _option(2, "DataLoader workers per process")
    device: str = _option("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    output_dir: str = _option("runs/csa", "checkpoint.pth, history.csv/json, curves.png go here")
    resume: str | None = _option(None, "checkpoint to continue from, or 'auto' (<output_dir>/checkpoint.pth if present)")
    save_every: int = _option(0, "also keep checkpoint-epochNNN.pth every N epochs (0: never)")
    progress: bool = _option(True, "tqdm progress bars (rank 0)")

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
    parser = argparse.ArgumentParser(prog="csa train", description="Train a CSA re-ranker (single process or under torchrun).",
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


def config_to_argv(config: TrainConfig) -> list[str]:
    """The ``csa train`` command-line flags that reproduce ``config`` (fields left at None are omitted)."""
    argv: list[str] = []
    for option in dataclasses.fields(config):
        value = getattr(config, option.name)
        flag = "--" + option.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + option.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
