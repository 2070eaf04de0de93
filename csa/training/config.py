"""Training configuration: every hyper-parameter of a run, as a dataclass and as command-line flags.

The defaults are the ``paper`` recipe; :meth:`TrainConfig.from_recipe` starts from any named recipe of
:mod:`csa.training.recipes` and overrides single fields (``csa train --recipe official --batch-size 128``).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from csa.device import resolve_device
from csa.training.recipes import RECIPE_FIELDS, RECIPES, get_recipe
from csa.validation import CSAInputError, check_float, check_int

__all__ = ["TrainConfig", "DESCRIPTION", "add_arguments", "build_parser", "config_from_args", "config_from_argv",
           "config_to_argv", "parse_overrides", "check_hyperparameters", "option_flag", "resume_given"]


def _option(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _recipe_option(name: str, help: str, **kw: Any) -> Any:
    """A field of :data:`~csa.training.recipes.RECIPE_FIELDS`: its default is the ``paper`` recipe's value."""
    return _option(RECIPES["paper"].values[name], help, **kw)


def option_flag(name: str) -> str:
    """The command-line flag of a :class:`TrainConfig` field: ``base_lr`` -> ``--base-lr``."""
    return "--" + name.replace("_", "-")


def resume_given(resume: Any) -> bool:
    """Whether a ``--resume`` value asks to continue a run (``None``, ``''``, ``'None'``, ``'none'``: start afresh)."""
    return resume not in (None, "", "None", "none")


@dataclass
class TrainConfig:
    """Every hyper-parameter of a training run; the recipe fields default to the ``paper`` recipe's values."""

    recipe: str = _option("paper", "named recipe the other values start from (flags override single fields)",
                          choices=list(RECIPES))
    # data
    data_root: str = _option("data", "data root (annotations/, train/, cache/ inside)")
    trainset: str = _option("retrieval-SfM-120k", "training set name (annotations/<trainset>.pkl)")
    feature_names: list[str] = _option(["gl18-tl-resnet101-gem-w"], "feature sets; several = the paper's augmentation "
                                  "(e.g. gl18-tl-resnet50-gem-w gl18-tl-resnet101-gem-w gl18-tl-resnet152-gem-w)")
    split: str = _option("train", "annotation split used for training")
    cache_dir: str | None = _option(None, "neighbour-table cache folder (default: <data_root>/cache)")
    neighbour_chunk: int = _option(1024, "queries per chunk when computing the neighbour table")
    # model
    topk: int = _recipe_option("topk", "K: neighbours per sample (tokens = query + K; the official --topk counts "
                               "the query)")
    anchor_len: int = _recipe_option("anchor_len", "L: anchors (query + L-1 neighbours)")
    embed_dim: int = _recipe_option("embed_dim", "C: token dimension")
    depth: int = _recipe_option("depth", "transformer blocks")
    num_heads: int = _recipe_option("num_heads", "attention heads")
    mlp_ratio: float = _recipe_option("mlp_ratio", "MLP hidden size / C")
    qkv_bias: bool = _recipe_option("qkv_bias", "bias in the qkv projection")
    drop_rate: float = _recipe_option("drop_rate", "dropout")
    attn_drop_rate: float = _recipe_option("attn_drop_rate", "attention dropout")
    drop_path_rate: float = _recipe_option("drop_path_rate", "stochastic depth (drop-path) rate of the last block")
    # loss
    alpha: float = _recipe_option("alpha", "weight of the reconstruction loss")
    temperature: float = _recipe_option("temperature", "temperature t of the contrastive loss")
    # optimisation
    batch_size: int = _recipe_option("batch_size", "GLOBAL batch size (split evenly over processes)")
    num_epochs: int = _recipe_option("num_epochs", "epochs of the schedule")
    stop_at_epoch: int | None = _option(None, "stop after this epoch (the schedule still spans --num-epochs)")
    warmup_epochs: int = _recipe_option("warmup_epochs", "linear warm-up epochs")
    warmup_lr: float = _recipe_option("warmup_lr", "lr at the start of warm-up (before batch scaling)")
    base_lr: float = _recipe_option("base_lr", "lr at the end of warm-up (before batch scaling)")
    final_lr: float = _recipe_option("final_lr", "lr at the end of the cosine decay (before batch scaling)")
    lr_scaling: str = _recipe_option("lr_scaling", "lrs x batch/256 ('global'), x batch/reference_gpus/256 "
                                     "('per-gpu': the official code) or as given ('none')",
                                     choices=["global", "per-gpu", "none"])
    reference_gpus: int = _recipe_option("reference_gpus", "GPU count of the official 4-GPU script, used by "
                                         "--lr-scaling per-gpu and --sample-order fixed")
    momentum: float = _recipe_option("momentum", "SGD momentum")
    weight_decay: float = _recipe_option("weight_decay", "weight decay (never on biases and norms)")
    feature_align_decay: bool = _recipe_option("feature_align_decay", "also decay feature_align's weight (the "
                                               "official code does)")
    clip_grad: float = _recipe_option("clip_grad", "max gradient norm; 0 disables clipping")
    sample_order: str = _recipe_option("sample_order", "'reshuffle': a new permutation every epoch, the last "
                                       "partial global batch dropped; 'fixed': the official DistributedSampler "
                                       "order (one seeded permutation for every epoch, padded, last partial batch "
                                       "kept)", choices=["reshuffle", "fixed"])
    fp16_inputs: bool = _recipe_option("fp16_inputs", "round affinities to float16 before the model (the official "
                                       "code)")
    samples: str = _recipe_option("samples", "training queries: every image ('all') or only those whose cluster has "
                                  "another image ('with-positives'; the others stay tokens and anchors)",
                                  choices=["all", "with-positives"])
    amp: str = _option("auto", "fp16 mixed precision: auto (on with CUDA) | on | off", choices=["auto", "on", "off"])
    # run
    seed: int = _recipe_option("seed", "random seed (model init, sample order, permutations, dropout)")
    num_workers: int = _option(2, "DataLoader workers per process")
    device: str = _option("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    output_dir: str = _option("runs/csa", "checkpoint.pth, history.csv/json, curves.png go here")
    resume: str | None = _option(None, "checkpoint to continue from, or 'auto' (<output_dir>/checkpoint.pth if present)")
    overwrite: bool = _option(False, "start from scratch even when --output-dir already holds a run (replacing it)")
    save_every: int = _option(0, "also keep checkpoint-epochNNN.pth every N epochs (0: never)")
    progress: bool = _option(True, "tqdm progress bars (rank 0)")

    @classmethod
    def from_recipe(cls, name: str = "paper", **overrides: Any) -> "TrainConfig":
        """The recipe ``name`` (see :mod:`csa.training.recipes`) with single fields replaced by ``overrides``."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)} - {"recipe"}
        if unknown:
            raise CSAInputError(f"unknown training option(s) {sorted(unknown)}; see `csa train --help`")
        overrides.pop("recipe", None)
        return cls(recipe=name, **{**get_recipe(name).values, **overrides})

    def recipe_overrides(self) -> dict[str, Any]:
        """The recipe fields whose values differ from the named recipe's."""
        base = get_recipe(self.recipe).values
        return {k: getattr(self, k) for k in RECIPE_FIELDS if getattr(self, k) != base[k]}

    def check(self) -> None:
        """Raise CSAInputError on out-of-range or inconsistent values."""
        check_hyperparameters(self)  # every single-field bound; the checks below relate fields
        if self.warmup_epochs > self.num_epochs:
            raise CSAInputError(f"--warmup-epochs ({self.warmup_epochs}) must be <= --num-epochs ({self.num_epochs})")
        if self.stop_at_epoch is not None and self.stop_at_epoch > self.num_epochs:
            raise CSAInputError(f"--stop-at-epoch must lie in [1, --num-epochs={self.num_epochs}]")
        if self.embed_dim % self.num_heads:
            raise CSAInputError(f"--embed-dim {self.embed_dim} must be divisible by --num-heads {self.num_heads}")
        if not self.feature_names:
            raise CSAInputError("give at least one --feature-names")


#: Integer fields and their smallest allowed value.
_INT_MINIMUM = {"topk": 1, "anchor_len": 1, "embed_dim": 1, "depth": 1, "num_heads": 1, "batch_size": 1,
                "num_epochs": 1, "warmup_epochs": 0, "seed": 0, "num_workers": 0, "save_every": 0,
                "neighbour_chunk": 1, "reference_gpus": 1}
#: Float fields: (low, high, low excluded, high excluded); high None = unbounded.
_FLOAT_RANGE = {"base_lr": (0.0, None, True, False), "warmup_lr": (0.0, None, True, False),
                "final_lr": (0.0, None, False, False), "temperature": (0.0, None, True, False),
                "alpha": (0.0, None, False, False), "mlp_ratio": (0.0, None, True, False),
                "drop_rate": (0.0, 1.0, False, True), "attn_drop_rate": (0.0, 1.0, False, True),
                "drop_path_rate": (0.0, 1.0, False, True), "momentum": (0.0, 1.0, False, True),
                "weight_decay": (0.0, None, False, False), "clip_grad": (0.0, None, False, False)}


def check_hyperparameters(config: TrainConfig) -> None:
    """Refuse values no training run can use, naming the flag: learning rates and the temperature must
    be finite and > 0, dropouts in [0, 1), counts >= their minimum (epochs >= 1, workers >= 0, ...),
    the device one :func:`csa.device.resolve_device` accepts here (auto | cpu | cuda | cuda:N, CUDA present)."""
    for name, low in _INT_MINIMUM.items():
        check_int(option_flag(name), getattr(config, name), low)
    if config.stop_at_epoch is not None:
        check_int("--stop-at-epoch", config.stop_at_epoch, 1)
    for name, (low, high, low_open, high_open) in _FLOAT_RANGE.items():
        check_float(option_flag(name), getattr(config, name), low, high, low_open=low_open, high_open=high_open)
    if not isinstance(config.device, str):
        raise CSAInputError(f"--device {config.device!r} is not supported; use auto, cpu, cuda or cuda:N")
    try:
        resolve_device(config.device)
    except CSAInputError as exc:
        raise CSAInputError(f"--device {config.device}: {exc}") from exc
    if not str(config.output_dir).strip():
        raise CSAInputError("--output-dir is empty; give the folder the run writes to")
    if config.overwrite and resume_given(config.resume):
        raise CSAInputError("--overwrite starts from scratch and --resume continues a run: give one of them")


#: What ``csa train --help`` says the command does.
DESCRIPTION = ("Train a CSA re-ranker (single process or under torchrun). Start from --recipe paper|official|demo; "
               "flags override single fields.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--dry-run`` and one ``--flag-name`` per :class:`TrainConfig` field to ``parser``; return it.

    Recipe fields default to ``None`` (= take the recipe's value); the help shows the ``paper`` value.
    ``--dry-run`` prints the resolved configuration as JSON and exits.
    """
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration as JSON and exit")
    for f in dataclasses.fields(TrainConfig):
        flag = option_flag(f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f.metadata["help"]
        if f.name in RECIPE_FIELDS:
            help_text += f" [paper: {default}]"
        kw: dict[str, Any] = {"default": None if f.name in RECIPE_FIELDS else default, "help": help_text,
                              "dest": f.name}
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


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``csa train`` on its own (:func:`add_arguments`); the ``csa`` command adds the same flags."""
    return add_arguments(argparse.ArgumentParser(prog="csa train", description=DESCRIPTION,
                                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter))


def config_from_args(args: argparse.Namespace | dict[str, Any]) -> tuple[TrainConfig, bool]:
    """``(config, dry_run)`` from parsed flags (other names in ``args``, e.g. the sub-command's, are ignored):
    the ``--recipe`` with the given flags overriding it."""
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe"}
    overrides = {k: v for k, v in values.items() if k in fields and v is not None}
    return TrainConfig.from_recipe(values["recipe"], **overrides), bool(values.get("dry_run"))


def config_from_argv(argv: Any = None) -> tuple[TrainConfig, bool]:
    """``(config, dry_run)`` from command-line flags: the ``--recipe`` with the given flags overriding it."""
    return config_from_args(build_parser().parse_args(argv))


def parse_overrides(text: str) -> dict[str, Any]:
    """``"num_epochs=10, base_lr=0.2"`` -> ``{'num_epochs': 10, 'base_lr': 0.2}`` (notebook 2's parameter).

    Values are Python literals (numbers, True/False, None, quoted strings); names must be TrainConfig fields.
    """
    import ast

    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in known:
            raise CSAInputError(f"bad override {item!r}: write name=value pairs of training options separated by "
                                f"commas (known names: {', '.join(sorted(known))})")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def config_to_argv(config: TrainConfig) -> list[str]:
    """The ``csa train`` command-line flags that reproduce ``config`` (fields left at None are omitted)."""
    argv: list[str] = []
    for option in dataclasses.fields(config):
        value = getattr(config, option.name)
        flag = option_flag(option.name)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
