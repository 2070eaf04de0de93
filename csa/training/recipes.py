"""Named training recipes: frozen hyper-parameter sets that the CLI, torchrun, notebook 2 and the book read.

* ``paper`` — what the paper and the public README state: K = L = 512, C = 768, 2 blocks, 12 heads,
  dropout 0.1, t = 2, alpha = 0.2, global batch 256, 100 epochs, SGD (momentum 0.9, weight decay 1e-6),
  warm-up 0.001 -> 0.1 over 20 epochs then cosine to 0, gradient clipping at 1.0; learning rates scaled
  by the *global* batch / 256 (peak 0.1 at batch 256).
* ``official`` — what the public code does when its ``experiment_rSfm120k.sh`` runs on 4 GPUs: the lrs
  scaled by the *per-GPU* batch (64 / 256: peak 0.025, warm-up from 0.00025), no clipping, weight decay
  also on ``feature_align`` (its exclusion never matches a name there), one sample order fixed for every
  epoch (DistributedSampler without ``set_epoch``; padded to a multiple of 4, last partial batch kept),
  512 rows counting the query (K = 511 candidates), affinities rounded to float16 before the model.
  Kept fixed, not reproduced: the scheduler's IndexError on its last iteration, and an unseeded run
  (seed 0 here).
* ``demo`` — the small model of the embedded demo (CPU, minutes): K = L = 64, C = 128, 4 heads, and
  only the photos of a landmark as training queries (the demo trainsets also hold hundreds of photos
  without one, which stay as neighbours; rSfM120k has no such images).  ``demo-paris`` and
  ``demo-oxford`` are the variants chosen on each training city's own held-out landmarks
  (:data:`DEMO_SELECTED`, :mod:`csa.experiments.selection`).

:meth:`csa.training.config.TrainConfig.from_recipe` builds a configuration from a recipe plus single-field
overrides; :data:`DEPARTURES` says, field by field, where ``official`` differs from ``paper`` and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from csa.validation import CSAInputError

__all__ = ["Recipe", "RECIPES", "RECIPE_FIELDS", "DEPARTURES", "GRID", "DEMO_SELECTED", "get_recipe",
           "effective_lrs"]

#: The hyper-parameters a recipe fixes (everything else of TrainConfig is about data, devices and files).
RECIPE_FIELDS = (
    "topk", "anchor_len", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "drop_rate",
    "attn_drop_rate", "drop_path_rate", "alpha", "temperature", "batch_size", "num_epochs", "warmup_epochs",
    "warmup_lr", "base_lr", "final_lr", "lr_scaling", "reference_gpus", "momentum", "weight_decay",
    "feature_align_decay", "clip_grad", "sample_order", "fp16_inputs", "samples", "seed",
)


@dataclass(frozen=True)
class Recipe:
    """A named, frozen set of values for every field of :data:`RECIPE_FIELDS`."""

    name: str
    summary: str
    values: Mapping[str, Any] = field(repr=False)

    def __post_init__(self) -> None:
        missing = set(RECIPE_FIELDS) - set(self.values)
        extra = set(self.values) - set(RECIPE_FIELDS)
        if missing or extra:
            raise ValueError(f"recipe {self.name!r}: missing {sorted(missing)}, unknown {sorted(extra)}")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


_PAPER = dict(
    topk=512, anchor_len=512, embed_dim=768, depth=2, num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.1,
    attn_drop_rate=0.1, drop_path_rate=0.1, alpha=0.2, temperature=2.0, batch_size=256, num_epochs=100,
    warmup_epochs=20, warmup_lr=0.001, base_lr=0.1, final_lr=0.0, lr_scaling="global", reference_gpus=4,
    momentum=0.9, weight_decay=1e-6, feature_align_decay=False, clip_grad=1.0, sample_order="reshuffle",
    fp16_inputs=False, samples="all", seed=0,
)

#: Where ``official`` departs from ``paper``: field -> (official value's meaning, source).
DEPARTURES: Mapping[str, str] = MappingProxyType({
    "topk": "the official `--topk 512` counts the query: 511 candidates + the query = 512 token rows",
    "lr_scaling": "train.py divides the batch by the GPU count before `lr * batch / 256`: "
                  "on 4 GPUs the peak lr is 0.1 * 64 / 256 = 0.025 and warm-up starts at 0.00025",
    "clip_grad": "the README says clipping at 1.0, but `--clip_max_norm` defaults to 0 (off) and the script "
                 "does not set it",
    "feature_align_decay": "the decay exclusion compares full parameter names with {'feature_align'}, which "
                           "matches none, so feature_align.layers.0.weight is decayed",
    "sample_order": "DistributedSampler without set_epoch: one seeded permutation for every epoch, padded "
                    "to a multiple of the GPU count, the last partial batch kept",
    "fp16_inputs": "train.py feeds `sim_list.half()`: affinities are rounded to float16 before the model",
})

_DEMO = {**_PAPER, "topk": 64, "anchor_len": 64, "embed_dim": 128, "num_heads": 4, "batch_size": 32,
         "num_epochs": 40, "warmup_epochs": 8, "warmup_lr": 0.005, "base_lr": 0.5, "samples": "with-positives"}

#: The settings ``csa demo select`` tries (:mod:`csa.experiments.selection`), as changes to the ``demo`` recipe
#: (each named by what it changes).
GRID: Mapping[str, Mapping[str, Any]] = {
    "demo": {},
    "t=0.5": {"temperature": 0.5},
    "K=L=128": {"topk": 128, "anchor_len": 128},
    "120 epochs": {"num_epochs": 120, "warmup_epochs": 24},
    "lr x2": {"base_lr": 1.0, "warmup_lr": 0.01},
    "t=0.5, K=L=128": {"temperature": 0.5, "topk": 128, "anchor_len": 128},
}

#: The demo recipe of each training set, chosen by ``csa demo select`` on that city's own held-out
#: landmarks (``data/demo/results/selection_<trainset>.csv``; the setting names are those of
#: :data:`GRID`).  The test city played no part in either choice.
DEMO_SELECTED: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "rparis6k-mini-train": MappingProxyType({"setting": "t=0.5, K=L=128", "recipe": "demo-paris"}),
    "roxford5k-mini-train": MappingProxyType({"setting": "120 epochs", "recipe": "demo-oxford"}),
})

RECIPES: Mapping[str, Recipe] = MappingProxyType({
    "paper": Recipe("paper", "the paper's and README's stated recipe (global-batch lr scaling)", _PAPER),
    "official": Recipe("official", "what the public code does on 4 GPUs (experiment_rSfm120k.sh)",
                       {**_PAPER, "topk": 511, "lr_scaling": "per-gpu", "clip_grad": 0.0,
                        "feature_align_decay": True, "sample_order": "fixed", "fp16_inputs": True}),
    "demo": Recipe("demo", "the embedded demo's small CPU model, the centre of the selection grid", _DEMO),
    "demo-paris": Recipe("demo-paris", "demo recipe chosen on Paris landmarks (trains the model tested on Oxford)",
                         {**_DEMO, **GRID[DEMO_SELECTED["rparis6k-mini-train"]["setting"]]}),
    "demo-oxford": Recipe("demo-oxford", "demo recipe chosen on Oxford landmarks (trains the model tested on Paris)",
                          {**_DEMO, **GRID[DEMO_SELECTED["roxford5k-mini-train"]["setting"]]}),
})


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a clear error lists the known ones."""
    if name not in RECIPES:
        raise CSAInputError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def effective_lrs(values: Mapping[str, Any]) -> dict[str, float]:
    """The learning rates a configuration really uses: ``{'scale', 'warmup_lr', 'peak_lr', 'final_lr'}``.

    ``lr_scaling``: ``'global'`` multiplies by batch_size / 256, ``'per-gpu'`` by
    (batch_size / reference_gpus) / 256 (the official code), ``'none'`` by 1.
    """
    mode = values["lr_scaling"]
    if mode == "global":
        scale = values["batch_size"] / 256
    elif mode == "per-gpu":
        scale = values["batch_size"] / values["reference_gpus"] / 256
    elif mode == "none":
        scale = 1.0
    else:
        raise CSAInputError(f"lr_scaling must be 'global', 'per-gpu' or 'none', got {mode!r}")
    return {"scale": scale, "warmup_lr": values["warmup_lr"] * scale, "peak_lr": values["base_lr"] * scale,
            "final_lr": values["final_lr"] * scale}
