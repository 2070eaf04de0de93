"""Descriptor extraction: image preparation, batch/worker/shard invariance, resume, stored descriptors."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csa.descriptors.extract import extract_descriptors, load_image_tensor
from csa.validation import CSAInputError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


class CountingGeMNet(torch.nn.Module):
    """Small deterministic conv + GeM + L2N net; counts the images it sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)
        self.meta = {"mean": [0.5] * 3, "std": [0.5] * 3, "outputdim": 16, "architecture": "toy"}
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        f = torch.relu(self.conv(x)).clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        return f / f.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(120, 90), (90, 120), (120, 90), (64, 64), (120, 90), (100, 70), (70, 100)]):
        p = d / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_load_image_tensor_crop_scale_and_normalization(tmp_path):
    arr = np.zeros((300, 400, 3), dtype=np.uint8)
    arr[:, :, 0] = 255
    p = tmp_path / "red.png"
    Image.fromarray(arr).save(p)
    x = load_image_tensor(p, 200, None, [0.5] * 3, [0.5] * 3)
    assert x.shape == (3, 150, 200)                       # long side 400 -> 200
    assert torch.allclose(x[0], torch.ones(150, 200)) and torch.allclose(x[1], -torch.ones(150, 200))
    crop = load_image_tensor(p, 200, [100.2, 50, 300, 250.4], [0.5] * 3, [0.5] * 3)
    assert crop.shape == (3, 100, 100)                    # 200 x 200 crop at the full image's scale 0.5
    assert load_image_tensor(p, 1000, None, [0] * 3, [1] * 3).shape == (3, 300, 400)  # never enlarged
    with pytest.raises(CSAInputError, match="empty"):
        load_image_tensor(p, 200, [10, 10, 5, 50], [0] * 3, [1] * 3)


def test_batch_and_worker_invariance(images):
    net = CountingGeMNet()
    ref = extract_descriptors(net, images, image_size=100, batch_size=1, progress=False)
    assert ref.shape == (len(images), 16) and ref.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1, atol=1e-5)
    batched = extract_descriptors(net, images, image_size=100, batch_size=4, progress=False)
    workers = extract_descriptors(net, images, image_size=100, batch_size=3, num_workers=2, progress=False)
    np.testing.assert_allclose(batched, ref, atol=1e-6)
    np.testing.assert_allclose(workers, ref, atol=1e-6)
    # each row is the descriptor of its own image, independently of the others
    single = extract_descriptors(net, images[5:6], image_size=100, progress=False)
    np.testing.assert_allclose(single[0], ref[5], atol=1e-6)


def test_multiscale_average_then_l2n(images):
    net = CountingGeMNet()
    scales = (1, 2 ** -0.5, 2 ** 0.5)
    got = extract_descriptors(net, images[:2], image_size=100, scales=scales, progress=False)
    for i in range(2):
        x = load_image_tensor(images[i], 100, None, [0.5] * 3, [0.5] * 3)[None]
        with torch.no_grad():
            vs = [net(torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                      if s != 1 else x)[0].double() for s in scales]
        v = sum(vs) / 3
        np.testing.assert_allclose(got[i], (v / v.norm()).numpy(), atol=1e-6)


def test_shard_resume_skips_finished_shards(images, tmp_path):
    net = CountingGeMNet()
    ref = extract_descriptors(net, images, image_size=100, progress=False)
    shard_dir = tmp_path / "shards"
    full = extract_descriptors(net, images, image_size=100, shard_dir=shard_dir, shard_size=3, progress=False)
    np.testing.assert_allclose(full, ref, atol=1e-6)
    shards = sorted(shard_dir.glob("shard_*.npy"))
    assert len(shards) == 3 and (shard_dir / "descriptors.npy").exists()
    # simulate an interruption: merged file and the middle shard missing
    (shard_dir / "descriptors.npy").unlink()
    shards[1].unlink()
    net.seen = 0
    resumed = extract_descriptors(net, images, image_size=100, shard_dir=shard_dir, shard_size=3, progress=False)
    assert net.seen == 3  # only the missing shard was recomputed
    np.testing.assert_allclose(resumed, ref, atol=1e-6)
    net.seen = 0
    again = extract_descriptors(net, images, image_size=100, shard_dir=shard_dir, shard_size=3, progress=False)
    assert net.seen == 0 and np.array_equal(again, resumed)
    with pytest.raises(CSAInputError, match="another extraction"):
        extract_descriptors(net, images, image_size=90, shard_dir=shard_dir, shard_size=3, progress=False)


def test_bad_inputs(images):
    net = CountingGeMNet()
    with pytest.raises(CSAInputError, match="empty"):
        extract_descriptors(net, [], progress=False)
    with pytest.raises(CSAInputError, match="not found"):
        extract_descriptors(net, [images[0].parent / "missing.jpg"], progress=False)
    with pytest.raises(CSAInputError, match="boxes"):
        extract_descriptors(net, images[:2], bbxs=[[0, 0, 5, 5]], progress=False)


@pytest.mark.slow
def test_reextraction_reproduces_stored_demo_descriptors():
    from csa.data.layout import load_gnd, load_test_features
    from csa.descriptors.lite0 import efficientnet_lite0_gem

    if not (DEMO / "test" / "roxford5k-mini" / "lite0-gem.pkl").exists():
        pytest.skip("run `csa demo extract --root data/demo` first")
    gnd = load_gnd(DEMO, "roxford5k-mini")
    feats = load_test_features(DEMO, "roxford5k-mini", "lite0-gem")
    net = efficientnet_lite0_gem()
    img = DEMO / "jpg" / "roxford5k-mini"
    db = extract_descriptors(net, [img / f"{n}.jpg" for n in gnd["imlist"][:3]], progress=False)
    q = extract_descriptors(net, [img / f"{n}.jpg" for n in gnd["qimlist"][:2]],
                            bbxs=[g["bbx"] for g in gnd["gnd"][:2]], progress=False)
    np.testing.assert_allclose(db, feats.db[:3], atol=1e-4)
    np.testing.assert_allclose(q, feats.query[:2], atol=1e-4)


def test_demo_derived_outputs_are_rewritten_identically_and_only_when_stale(demo_features, tmp_path, monkeypatch):
    """Leave-one-out benchmarks and trainsets are cut from the city's database rows: a stale one is rewritten
    byte for byte, the database descriptors are read once per city and only when something is stale."""
    import shutil

    import csa.descriptors.prepare as prepare

    for part in ("annotations", "test", "train"):
        shutil.copytree(demo_features / part, tmp_path / part)
    (tmp_path / "jpg").symlink_to(demo_features / "jpg")
    stale = [tmp_path / "test" / "roxford5k-mini-loo" / "lite0-gem.pkl.fingerprint",
             tmp_path / "train" / "roxford5k-mini-train" / "lite0-gem.pkl",
             tmp_path / "train" / "rparis6k-mini-train" / "lite0-gem.pkl.fingerprint"]
    for path in stale:
        path.unlink()
    loads = []
    real = prepare.load_test_features
    monkeypatch.setattr(prepare, "load_test_features", lambda *a, **kw: loads.append(a[1]) or real(*a, **kw))
    written = prepare.prepare_demo_features(tmp_path, device="cpu", progress=False)
    assert list(written) == ["roxford5k-mini", "roxford5k-mini-loo", "roxford5k-mini-train",
                             "rparis6k-mini", "rparis6k-mini-loo", "rparis6k-mini-train"]
    assert sorted(loads) == ["roxford5k-mini", "rparis6k-mini"]
    for key, path in written.items():
        rel = path.relative_to(tmp_path)
        for name in (rel, rel.with_name(rel.name + ".fingerprint")):
            assert (tmp_path / name).read_bytes() == (demo_features / name).read_bytes(), name
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("t*/*/*")}
    loads.clear()
    assert prepare.prepare_demo_features(tmp_path, device="cpu", progress=False) == written
    assert loads == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("t*/*/*")} == stamps


def test_parse_scales_reads_numbers_and_names_its_source_in_errors():
    from csa.descriptors.extract import parse_scales
    from csa.validation import CSAInputError

    assert parse_scales("1,0.7071,1.4142") == [1.0, 0.7071, 1.4142]
    with pytest.raises(CSAInputError, match=r"^scales must be comma-separated numbers"):
        parse_scales("1,x")
    with pytest.raises(CSAInputError, match=r"^--scales must be positive"):
        parse_scales("1,0", "--scales")
