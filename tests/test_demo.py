"""The embedded demo: ground-truth restriction, box scaling, landmarks, trainsets, committed files."""
import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csa.data.demo import CITIES, group_queries, image_landmarks, restrict_gnd, split_trainset

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="offline data ../shared/data not available")


def _load(p):
    with open(p, "rb") as f:
        return pickle.load(f)


def _manifest(folder):
    with open(SHARED / folder / "manifest.csv", newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def test_restrict_gnd_hand_built():
    cfg = {"imlist": ["a", "b", "c", "d", "e"], "qimlist": ["q0", "q1", "q2"],
           "gnd": [{"bbx": [10, 20, 30, 40], "easy": [0, 2], "hard": [3], "junk": [1, 4]},
                   {"bbx": [0, 0, 5, 5], "easy": [], "hard": [1], "junk": []},
                   {"bbx": [2, 2, 8, 8], "easy": [4], "hard": [], "junk": [0]}]}
    out = restrict_gnd(cfg, {"a", "c", "e", "q0", "q2"}, scale={"q0": 0.5, "q2": 2.0})
    assert out["imlist"] == ["a", "c", "e"] and out["qimlist"] == ["q0", "q2"]
    assert out["gnd"][0] == {"bbx": [5.0, 10.0, 15.0, 20.0], "easy": [0, 1], "hard": [], "junk": [2]}
    assert out["gnd"][1] == {"bbx": [4.0, 4.0, 16.0, 16.0], "easy": [2], "hard": [], "junk": [0]}


def test_group_queries_union_find_iou():
    gnd = [{"easy": [0, 1, 2], "hard": [3]},        # {0,1,2,3}
           {"easy": [2, 3], "hard": [4, 5]},         # {2,3,4,5}: IoU with q0 = 2/6 = 0.33 -> merged
           {"easy": [10, 11, 12], "hard": []},       # alone so far
           {"easy": [5, 20, 21, 22, 23], "hard": []},  # IoU with q1 = 1/8 -> not merged
           {"easy": [11, 12, 13], "hard": []}]       # IoU with q2 = 2/4 -> merged with q2
    labels = group_queries(gnd, iou=0.3)
    assert labels.tolist() == [0, 0, 1, 2, 1]
    assert group_queries(gnd, iou=0.34).tolist() == [0, 1, 2, 3, 2]
    chain = [{"easy": [0, 1], "hard": []}, {"easy": [1, 2], "hard": []}, {"easy": [2, 3], "hard": []}]
    assert group_queries(chain, iou=0.3).tolist() == [0, 0, 0]  # transitive through q1


def test_image_landmarks_votes():
    gnd = [{"easy": [0, 1], "hard": [], "junk": [4]}, {"easy": [1], "hard": [2], "junk": []},
           {"easy": [], "hard": [2], "junk": []}]
    lm = image_landmarks(gnd, 5, np.array([0, 1, 1]))
    assert lm.tolist() == [0, 0, 1, -1, -1]  # image 1: tie 1-1 -> lowest id; junk does not count


def test_split_trainset_keeps_clusters_whole_and_is_deterministic():
    rng = np.random.default_rng(3)
    lm = rng.integers(-1, 6, size=200)
    names = [f"im{i}" for i in range(200)]
    a, b = split_trainset(names, lm), split_trainset(names, lm)
    assert a == b
    tr, va = a["train"], a["val"]
    assert sorted(tr["images"] + va["images"]) == sorted(names)
    assert not set(tr["cluster"]) & set(va["cluster"])
    assert len(set(tr["cluster"]) & set(range(6))) >= 1 and len(set(va["cluster"]) & set(range(6))) >= 1
    idx = {n: i for i, n in enumerate(names)}
    for split in (tr, va):
        for n, c in zip(split["images"], split["cluster"]):
            assert c == lm[idx[n]] if lm[idx[n]] >= 0 else c >= 6
    assert 0.05 * 200 <= len(va["images"]) <= 0.5 * 200


@needs_shared
@pytest.mark.parametrize("dataset", list(CITIES))
def test_demo_gnd_matches_official_for_some_queries(dataset):
    city = CITIES[dataset]
    official = _load(SHARED / city["gnd"])
    demo = _load(DEMO / "annotations" / dataset / f"gnd_{dataset}.pkl")
    manifest = _manifest(city["folder"])
    present = set(manifest)
    assert demo["imlist"] == [n for n in official["imlist"] if n in present]
    assert not set(demo["imlist"]) & set(demo["qimlist"])
    for qi in (0, len(demo["qimlist"]) // 2, len(demo["qimlist"]) - 1):
        name = demo["qimlist"][qi]
        oq = official["qimlist"].index(name)
        for key in ("easy", "hard", "junk"):
            expected = {official["imlist"][i] for i in official["gnd"][oq][key]} & present
            assert {demo["imlist"][j] for j in demo["gnd"][qi][key]} == expected
        s = int(manifest[name]["width"]) / int(manifest[name]["orig_width"])
        np.testing.assert_allclose(demo["gnd"][qi]["bbx"], np.array(official["gnd"][oq]["bbx"]) * s)
        w, h = Image.open(DEMO / "jpg" / dataset / f"{name}.jpg").size
        x1, y1, x2, y2 = demo["gnd"][qi]["bbx"]
        assert -1 <= x1 < x2 <= w + 1 and -1 <= y1 < y2 <= h + 1  # the scaled box lies on the stored photo


@pytest.mark.parametrize("dataset", list(CITIES))
def test_committed_demo_files(dataset):
    demo = _load(DEMO / "annotations" / dataset / f"gnd_{dataset}.pkl")
    expected = {"roxford5k-mini": (1124, 13), "rparis6k-mini": (415, 12)}[dataset]
    assert (len(demo["imlist"]), len(demo["qimlist"])) == expected
    names = demo["imlist"] + demo["qimlist"]
    files = sorted(p.stem for p in (DEMO / "jpg" / dataset).glob("*.jpg"))
    assert files == sorted(names)
    for name in names[:: max(1, len(names) // 15)]:
        with Image.open(DEMO / "jpg" / dataset / f"{name}.jpg") as im:
            assert im.format == "JPEG" and max(im.size) == 512
            assert "exif" not in im.info and "icc_profile" not in im.info
    train = _load(DEMO / "annotations" / f"{CITIES[dataset]['trainset']}.pkl")
    all_train = train["train"]["images"] + train["val"]["images"]
    assert sorted(all_train) == sorted(demo["imlist"])
    for split in ("train", "val"):
        assert len(train[split]["images"]) == len(train[split]["cluster"]) > 0
    assert not set(train["train"]["cluster"]) & set(train["val"]["cluster"])


def test_committed_demo_size_under_55mb():
    committed = [p for sub in ("jpg", "annotations") for p in (DEMO / sub).rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in committed) + (DEMO.parent / "README.md").stat().st_size
    assert 1500 < len(committed) and total < 55e6


def test_image_categories_majority_and_landmark_junk():
    from csa.data.demo import image_categories

    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3, 0]},        # landmark 0
           {"easy": [1], "hard": [0, 2], "junk": [4]},           # landmark 0
           {"easy": [5], "hard": [], "junk": [1]}]               # landmark 1
    image_landmark = np.array([0, 0, 0, -1, -1, 1])
    category, junk = image_categories(gnd, image_landmark, np.array([0, 0, 1]))
    assert category.tolist() == ["easy", "easy", "hard", "", "", "easy"]    # image 0: 1 easy vs 1 hard -> easy
    assert junk == {0: {3, 4}, 1: {1}}                                       # a landmark's own photos are never its junk


def test_leave_one_out_gnd_queries_every_landmark_photo_against_the_rest():
    from csa.data.demo import leave_one_out_gnd

    imlist = ["a", "b", "c", "d", "e"]
    landmark = np.array([0, 0, 0, -1, 1])                     # e is alone in its landmark: not a query
    category = np.array(["easy", "hard", "easy", "", "easy"], dtype=object)
    sizes = {n: (40, 30) for n in imlist}
    out = leave_one_out_gnd(imlist, landmark, category, {0: {3}}, sizes)
    assert out["imlist"] == imlist and out["qimlist"] == ["a", "b", "c"]
    assert out["gnd"][0] == {"bbx": [0.0, 0.0, 40.0, 30.0], "easy": [2], "hard": [1], "junk": [0, 3]}
    assert out["gnd"][1] == {"bbx": [0.0, 0.0, 40.0, 30.0], "easy": [0, 2], "hard": [], "junk": [1, 3]}


@needs_shared
def test_committed_loo_benchmarks_match_a_rebuild(tmp_path):
    from csa.data.demo import build_demo
    from csa.data.layout import load_gnd

    build_demo(SHARED, tmp_path, progress=False)
    for dataset in ("roxford5k-mini-loo", "rparis6k-mini-loo"):
        committed, rebuilt = load_gnd(DEMO, dataset), load_gnd(tmp_path, dataset)
        assert committed == rebuilt
        base = load_gnd(DEMO, dataset.replace("-loo", ""))
        assert committed["imlist"] == base["imlist"] and set(committed["qimlist"]) <= set(base["imlist"])
        for name, g in zip(committed["qimlist"], committed["gnd"]):
            own = committed["imlist"].index(name)
            assert own in g["junk"] and own not in g["easy"] + g["hard"] and g["easy"] + g["hard"]
