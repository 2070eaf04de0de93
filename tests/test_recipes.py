"""The named recipes against the official code's definitions, written out here independently."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from csa.model import RerankTransformer
from csa.training.config import TrainConfig, parse_overrides
from csa.training.engine import train_one_epoch
from csa.training.recipes import DEPARTURES, RECIPE_FIELDS, RECIPES, effective_lrs, get_recipe
from csa.training.sampler import GlobalBatchSampler
from csa.cli import main as csa_main
from csa.training.train import build_optimization
from csa.validation import CSAInputError


# --- the official definitions (MCC-WH/CSA train.py / utils/helpfunc.py), restated ------------------
def official_groups(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """add_weight_decay: 1-D params and biases are not decayed; the skip list {'feature_align'} is compared
    with full parameter names and never matches."""
    no_decay = {n for n, p in model.named_parameters() if len(p.shape) == 1 or n.endswith(".bias") or n in {"feature_align"}}
    return no_decay, {n for n, _ in model.named_parameters()} - no_decay


def official_lr_schedule(batch: int, gpus: int, base_lr: float, warmup_lr: float, final_lr: float,
                         warmup_epochs: int, num_epochs: int, iters: int) -> np.ndarray:
    """train.py: lrs x (batch / gpus) / 256; WarmupCos_Scheduler: linspace warm-up, then cosine."""
    s = (batch // gpus) / 256
    warm = np.linspace(warmup_lr * s, base_lr * s, iters * warmup_epochs)
    decay = iters * (num_epochs - warmup_epochs)
    cosine = final_lr * s + 0.5 * (base_lr * s - final_lr * s) * (1 + np.cos(math.pi * np.arange(decay) / decay))
    return np.concatenate([warm, cosine])


SMALL = dict(topk=7, anchor_len=8, embed_dim=16, num_heads=2, depth=1)


def test_paper_is_the_default_and_official_differs_exactly_where_documented():
    assert TrainConfig() == TrainConfig.from_recipe("paper")
    paper, official = get_recipe("paper").values, get_recipe("official").values
    differing = {k for k in RECIPE_FIELDS if paper[k] != official[k]}
    assert differing == set(DEPARTURES)
    assert official["topk"] + 1 == 512 and official["anchor_len"] == 512     # 512 rows counting the query
    with pytest.raises(TypeError):
        get_recipe("paper").values["base_lr"] = 1.0                          # frozen
    with pytest.raises(CSAInputError, match="unknown recipe"):
        get_recipe("nope")


def test_effective_learning_rates_of_the_three_recipes():
    assert effective_lrs(RECIPES["paper"].values)["peak_lr"] == pytest.approx(0.1)
    official = effective_lrs(RECIPES["official"].values)
    assert official["peak_lr"] == pytest.approx(0.025) and official["warmup_lr"] == pytest.approx(0.00025)
    demo = effective_lrs(RECIPES["demo"].values)
    assert demo["peak_lr"] == pytest.approx(0.5 * 32 / 256)


def test_official_optimizer_groups_and_every_learning_rate_of_a_short_schedule():
    config = TrainConfig.from_recipe("official", num_epochs=5, warmup_epochs=2, **SMALL)
    model = RerankTransformer(anchor_len=8, embed_dim=16, depth=1, num_heads=2)
    iters = 7
    optimizer, schedule = build_optimization(config, model, iters)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["group_name"]: ({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in optimizer.param_groups}
    no_decay, decay = official_groups(model)
    assert groups["no_decay"] == (no_decay, 0.0) and groups["decay"] == (decay, 1e-6)
    assert "feature_align.layers.0.weight" in decay
    expected = official_lr_schedule(256, 4, 0.1, 0.001, 0.0, 2, 5, iters)
    got = np.array([schedule.lr_at(t) for t in range(5 * iters)])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    # the paper recipe keeps feature_align out of the decay and scales by the global batch
    paper_opt, paper_sched = build_optimization(TrainConfig.from_recipe("paper", **SMALL), model, iters)
    paper_decay = {names[id(p)] for g in paper_opt.param_groups if g["group_name"] == "decay" for p in g["params"]}
    assert paper_decay == decay - {"feature_align.layers.0.weight"}
    assert paper_sched.base_lr == pytest.approx(4 * schedule.base_lr)


def test_official_step_has_no_clipping():
    """One official step (no clipping) with huge gradients: the update equals plain SGD on the raw gradient."""
    torch.manual_seed(0)
    config = TrainConfig.from_recipe("official", drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, **SMALL)
    assert config.clip_grad == 0
    model = RerankTransformer(anchor_len=8, embed_dim=16, depth=1, num_heads=2, drop_rate=0, attn_drop_rate=0,
                              drop_path_rate=0)
    reference = RerankTransformer(anchor_len=8, embed_dim=16, depth=1, num_heads=2, drop_rate=0, attn_drop_rate=0,
                                  drop_path_rate=0)
    reference.load_state_dict(model.state_dict())
    affinity = torch.randn(4, 8, 8) * 50
    targets = torch.zeros(4, 8)
    targets[:, :3] = 1
    optimizer, schedule = build_optimization(config, model, 1)
    from csa.losses import CSACriterion

    criterion = CSACriterion(config.alpha, config.temperature)
    train_one_epoch(model, criterion, [{"affinity": affinity, "targets": targets}], optimizer, schedule, "cpu",
                    clip_grad=config.clip_grad, progress=False, fp16_inputs=True)
    # reference: fp16-rounded inputs, raw gradients, SGD with the official groups at the first warm-up lr
    x = affinity.half().float()
    tokens, rec = reference(x)
    loss = criterion(tokens, rec, x, targets)["loss"]
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in reference.parameters()))
    assert grad_norm > 1.0                                                   # clipping at 1.0 would have acted
    lr = 0.001 * 64 / 256
    with torch.no_grad():
        for name, p in reference.named_parameters():
            decay = 0.0 if (p.ndim == 1 or name.endswith(".bias")) else 1e-6
            p -= lr * (p.grad + decay * p)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("n,batch", [(103, 16), (96, 16), (50, 8)])
def test_fixed_order_equals_the_official_distributed_sampler_on_four_gpus(n, batch):
    """Union over the 4 ranks of torch's DistributedSampler + BatchSampler(drop_last=False) at iteration b ==
    our global batch b; the same order every epoch (no set_epoch)."""
    ranks = [list(BatchSampler(DistributedSampler(range(n), num_replicas=4, rank=r, shuffle=True, seed=0),
                               batch // 4, drop_last=False)) for r in range(4)]
    ours = GlobalBatchSampler(n, batch, seed=0, order="fixed", reference_gpus=4)
    assert len(ours) == len(ranks[0])
    for epoch in (0, 3):
        ours.set_epoch(epoch)
        for b, batch_ids in enumerate(ours):
            assert sorted(batch_ids) == sorted(i for r in range(4) for i in ranks[r][b])
    two = [GlobalBatchSampler(n, batch, rank=r, world_size=2, seed=0, order="fixed") for r in range(2)]
    assert [a + b for a, b in zip(*two)] == list(ours)


def test_cli_dry_run_prints_the_resolved_recipe(capsys):
    assert csa_main(["train", "--recipe", "official", "--batch-size", "128", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["recipe"] == "official" and out["config"]["clip_grad"] == 0.0
    assert out["overrides"] == {"batch_size": 128}
    assert out["effective_lrs"]["peak_lr"] == pytest.approx(0.1 * 32 / 256)
    assert csa_main(["train", "--recipe", "demo", "--dry-run"]) == 0
    demo = json.loads(capsys.readouterr().out)["config"]
    assert (demo["topk"], demo["embed_dim"], demo["base_lr"]) == (64, 128, 0.5)


def test_parse_overrides():
    assert parse_overrides("num_epochs=3, base_lr=0.2,recipe='demo'") == {"num_epochs": 3, "base_lr": 0.2,
                                                                         "recipe": "demo"}
    assert parse_overrides("") == {}
    with pytest.raises(CSAInputError, match="bad override"):
        parse_overrides("epochs=3")


def test_selected_demo_recipes_are_the_committed_selection():
    """Each demo recipe is the demo centre plus the grid setting that won on its own training city."""
    from pathlib import Path

    import pandas as pd

    from csa.training.recipes import DEMO_SELECTED
    from csa.experiments.selection import GRID, choose

    results = Path(__file__).resolve().parents[1] / "data" / "demo" / "results"
    for trainset, chosen in DEMO_SELECTED.items():
        table = pd.read_csv(results / f"selection_{trainset}.csv")
        assert set(table["trainset"]) == {trainset} and set(table["setting"]) == set(GRID)
        assert table.groupby("setting").size().eq(3).all()                      # three folds each
        assert choose(table) == chosen["setting"]
        assert dict(get_recipe(chosen["recipe"]).values) == {**RECIPES["demo"].values, **GRID[chosen["setting"]]}
