"""Tests of csa.training.engine: lr schedule, optimizer groups, indexed affinity, one epoch (clipping, skipped losses)."""
from __future__ import annotations

import math

import pytest
import torch

from csa.affinity import indexed_affinity
from csa.training.engine import StepOptions, WarmupCosineSchedule, build_optimizer, train_one_epoch
from csa.losses import CSACriterion
from csa.model import RerankTransformer
from csa.validation import CSAInputError


def tiny_model(**kw) -> RerankTransformer:
    torch.manual_seed(0)
    args = dict(anchor_len=6, embed_dim=8, depth=1, num_heads=2, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    args.update(kw)
    return RerankTransformer(**args)


# ---------------------------------------------------------------- schedule
def test_schedule_values_at_hand_computed_iterations():
    # 2 warm-up epochs, 4 epochs, 5 iterations/epoch: W = 10, T = 20
    s = WarmupCosineSchedule(None, base_lr=0.1, warmup_lr=0.001, final_lr=0.0, warmup_epochs=2, num_epochs=4,
                             iters_per_epoch=5)
    assert s.lr_at(0) == pytest.approx(0.001)                      # start of warm-up
    assert s.lr_at(3) == pytest.approx(0.001 + 0.099 * 3 / 9)       # linear (numpy linspace over 10 points)
    assert s.lr_at(9) == pytest.approx(0.1)                         # end of warm-up
    assert s.lr_at(10) == pytest.approx(0.1)                        # start of the cosine
    assert s.lr_at(15) == pytest.approx(0.05)                       # halfway: cos(pi / 2) = 0
    assert s.lr_at(19) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.9)))  # last iteration
    assert s.lr_at(20) == 0.0 and s.lr_at(100) == 0.0               # after the end: final_lr
    s2 = WarmupCosineSchedule(None, 1.0, 0.5, 0.2, 0, 2, 4)         # no warm-up, final_lr > 0
    assert s2.lr_at(0) == pytest.approx(1.0) and s2.lr_at(4) == pytest.approx(0.6)


def test_schedule_steps_the_optimizer_and_round_trips_state():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))], lr=9.0)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    s = WarmupCosineSchedule(opt, 0.1, 0.001, 0.0, 2, 4, 5)
    lrs = [s.step() for _ in range(12)]
    assert lrs[0] == pytest.approx(0.001) and lrs[11] == pytest.approx(s.lr_at(11))
    assert all(g["lr"] == pytest.approx(s.lr_at(11)) for g in opt.param_groups)
    s2 = WarmupCosineSchedule(opt, 0.1, 0.001, 0.0, 2, 4, 5)
    s2.load_state_dict(s.state_dict())
    assert s2.iteration == 12 and s2.step() == pytest.approx(s.lr_at(12))
    with pytest.raises(CSAInputError):
        WarmupCosineSchedule(None, 0.1, 0.001, 0.0, 5, 4, 5)


# ---------------------------------------------------------------- optimizer
def test_optimizer_groups_decay_only_matrices_outside_feature_align():
    model = tiny_model(depth=2)
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-6)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["group_name"]: g for g in opt.param_groups}
    decayed = sorted(names[id(p)] for p in groups["decay"]["params"])
    expected = sorted(f"blocks.{b}.{m}.weight" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert decayed == sorted(expected + ["topk_proj.weight"])
    skipped = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "feature_align.layers.0.weight" in skipped and "blocks.0.norm1.weight" in skipped
    assert "topk_proj.bias" in skipped and "blocks.1.mlp.fc2.bias" in skipped
    assert len(skipped) + len(decayed) == len(names)
    assert groups["decay"]["weight_decay"] == 1e-6 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["momentum"] == 0.9 and g["lr"] == 0.1 for g in opt.param_groups)


# ---------------------------------------------------------------- affinity
def test_indexed_affinity_matches_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(40, 16, generator=g, dtype=torch.float64), dim=1)
    tok = torch.randint(0, 40, (3, 7), generator=g)
    anc = torch.randint(0, 40, (3, 5), generator=g)
    got = indexed_affinity(feats, tok, anc)
    assert got.shape == (3, 7, 5)
    for b in range(3):
        for i in range(7):
            for j in range(5):
                want = float(sum(feats[tok[b, i], d] * feats[anc[b, j], d] for d in range(16)))
                assert float(got[b, i, j]) == pytest.approx(want, abs=1e-12)
    with pytest.raises(CSAInputError):
        indexed_affinity(feats, tok[0], anc)


# ---------------------------------------------------------------- one epoch
def _batches(n_batches: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        tokens = torch.randint(0, 30, (4, 5), generator=g)
        targets = (torch.rand(4, 5, generator=g) > 0.5).float()
        targets[:, 0] = 1.0
        out.append({"tokens": tokens, "anchors": torch.randint(0, 30, (4, 6), generator=g), "targets": targets})
    return out


def test_train_one_epoch_clips_gradients():
    feats = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    model = tiny_model()
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    opt = build_optimizer(model, lr=1.0, momentum=0.0, weight_decay=0.0)
    stats = train_one_epoch(model, CSACriterion(), _batches(1), opt, None, "cpu", clip_grad=1e-3, progress=False,
                            features=feats)
    step = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - before
    assert float(step.norm()) == pytest.approx(1e-3, rel=1e-3)  # lr 1 x clipped gradient of norm 1e-3
    assert stats["iterations"] == 1 and stats["skipped"] == 0 and math.isfinite(stats["loss"])
    # no clipping: the step is the full gradient, much larger here
    model2 = tiny_model()
    opt2 = build_optimizer(model2, lr=1.0, momentum=0.0, weight_decay=0.0)
    train_one_epoch(model2, CSACriterion(), _batches(1), opt2, None, "cpu", clip_grad=0, progress=False, features=feats)
    step2 = torch.nn.utils.parameters_to_vector(model2.parameters()).detach() - before
    assert float(step2.norm()) > 0.01


def test_step_options_object_and_keywords_train_alike():
    """StepOptions(clip_grad=...) and the clip_grad= keyword give the same weights; both at once, or an unknown
    option, is refused."""
    feats = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    weights = []
    for kwargs in ({"options": StepOptions(clip_grad=1e-2)}, {"clip_grad": 1e-2}):
        model = tiny_model()
        opt = build_optimizer(model, lr=1.0, momentum=0.0, weight_decay=0.0)
        train_one_epoch(model, CSACriterion(), _batches(2), opt, None, "cpu", progress=False, features=feats, **kwargs)
        weights.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    assert torch.equal(weights[0], weights[1])
    model = tiny_model()
    opt = build_optimizer(model, lr=1.0)
    with pytest.raises(CSAInputError, match="not both"):
        train_one_epoch(model, CSACriterion(), _batches(1), opt, None, "cpu", StepOptions(), clip_grad=0.0,
                        progress=False, features=feats)
    with pytest.raises(CSAInputError, match="clip_gard"):
        train_one_epoch(model, CSACriterion(), _batches(1), opt, None, "cpu", clip_gard=0.0, progress=False,
                        features=feats)


class NanOnSecondCall(CSACriterion):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, *args):
        out = super().forward(*args)
        self.calls += 1
        if self.calls == 2:
            out = {k: v * float("nan") for k, v in out.items()}
        return out


def test_non_finite_loss_is_skipped_counted_and_warned():
    feats = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    model = tiny_model()
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.0)
    schedule = WarmupCosineSchedule(opt, 0.1, 0.01, 0.0, 0, 1, 3)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        stats = train_one_epoch(model, NanOnSecondCall(), _batches(3), opt, schedule, "cpu", progress=False,
                                features=feats)
    assert stats["skipped"] == 1 and stats["iterations"] == 3
    assert math.isfinite(stats["loss"]) and all(torch.isfinite(p).all() for p in model.parameters())
    assert schedule.iteration == 3  # the schedule follows the iteration count, skipped ones included
    # the mean covers the two finite iterations only: recompute them on an identical model
    model_b = tiny_model()
    opt_b = build_optimizer(model_b, lr=0.1, momentum=0.9, weight_decay=0.0)
    sched_b = WarmupCosineSchedule(opt_b, 0.1, 0.01, 0.0, 0, 1, 3)
    batches = _batches(3)
    first = train_one_epoch(model_b, CSACriterion(), batches[:1], opt_b, sched_b, "cpu", progress=False, features=feats)
    sched_b.step()  # the skipped iteration
    third = train_one_epoch(model_b, CSACriterion(), batches[2:], opt_b, sched_b, "cpu", progress=False, features=feats)
    assert stats["loss"] == pytest.approx((first["loss"] + third["loss"]) / 2, rel=1e-6)
    for p, q in zip(model.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q)
