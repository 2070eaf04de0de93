"""Bad input gives one clear error (or the correct result), and no file is left half-written or replaced.

One test per class of problem: impossible rankings, features that do not match their ground truth,
training settings that cannot learn, non-finite or ambiguous checkpoints, evaluation settings, output
locations, unsafe pickles, corrupt checkpoints, and the command line (one line, no traceback).
"""
from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _toy_data import TOY_GND, toy_descriptors, write_toy_root
from _train_helpers import TOY_TRAINSET, tiny_config, write_toy_trainset
from csa.checkpoint import load_checkpoint, load_model, save_checkpoint
from csa.cli import main as csa_main
from csa.compare.expansion import aqe
from csa.data.layout import load_gnd, load_test_features, save_gnd, save_test_features
from csa.evaluate import compute_map, evaluate_revisited
from csa.fileio import PickleRefused, load_pickle
from csa.model import RerankTransformer
from csa.rerank import rerank
from csa.search import first_stage
from csa.training.engine import NonFiniteLossError, train_one_epoch
from csa.training.train import run_training
from csa.validation import CSAInputError, check_ranks



def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys, command: str) -> str:
    """The command's stderr: exactly one line ``csa <command>: error: ...``, no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"csa {command}: error:"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture()
def root(tmp_path):
    return write_toy_root(tmp_path)


# --------------------------------------------------------------------------------------------
# silent wrong results
# --------------------------------------------------------------------------------------------
def test_impossible_rankings_are_refused_everywhere(root, capsys):
    q, db = toy_descriptors()
    ranks = first_stage(q, db)
    gnd = TOY_GND["gnd"]
    zeros = np.zeros_like(ranks)                                   # the all-zeros array of the report
    duplicated = ranks.copy()
    duplicated[1, 1] = duplicated[0, 1]                            # query 1 lists its first image twice
    negative = ranks.copy()
    negative[5, 0] = -1
    for bad, fact in ((zeros, "more than once"), (duplicated, "column 1"), (negative, "-1")):
        with pytest.raises(CSAInputError, match=fact):
            evaluate_revisited(bad, gnd)
        with pytest.raises(CSAInputError, match=fact):
            compute_map(bad, [{"ok": [0, 1], "junk": []}] * 2)
        with pytest.raises(CSAInputError, match=fact):
            aqe(q, db, bad)
        with pytest.raises(CSAInputError):
            rerank(RerankTransformer(anchor_len=8, embed_dim=16, num_heads=2), q, db, bad, topk=16, anchor_len=8,
                   progress=False)
    out_of_range = ranks.copy()
    out_of_range[3, 0] = 40
    with pytest.raises(CSAInputError, match=r"\[0, 39\]"):
        evaluate_revisited(out_of_range, gnd, n_db=40)
    # only the used prefix counts: a re-ranking depth of 16 ignores what lies below row 16
    deep = ranks.copy()
    deep[30, 0] = deep[31, 0]
    check_ranks(deep, 40, 2, prefix=16)
    with pytest.raises(CSAInputError):
        check_ranks(deep, 40, 2)
    # a valid ranking still scores as defined; the command line refuses the all-zeros file
    perfect = np.stack([np.arange(40), np.roll(np.arange(40), -10)], axis=1)   # positives first
    assert evaluate_revisited(perfect, gnd)["medium"]["map"] == 100.0
    np.save(root / "zeros.npy", zeros)
    assert csa_main(["evaluate", "--data-root", str(root), "--dataset", "toy", "--features", "feat",
                     "--ranks", str(root / "zeros.npy")]) == 2
    assert "more than once" in one_error_line(capsys, "evaluate")


def test_the_ranks_check_is_fast_on_a_full_ranking():
    n, q = 300_000, 70
    ranks = np.argsort(np.random.default_rng(0).random((q, n)), axis=1).T     # (N, Q), distinct columns
    start = time.perf_counter()
    check_ranks(ranks, n, q)
    assert time.perf_counter() - start < 2.0   # about 0.2 s here; 1M x 70 scales linearly


def test_features_that_do_not_match_the_ground_truth(root):
    q, db = toy_descriptors()
    save_test_features(root, "toy", "short", query=q, db=db[:39])     # one database row missing
    with pytest.raises(CSAInputError, match="short.pkl.*39 rows but 40"):
        load_test_features(root, "toy", "short")
    save_test_features(root, "toy", "oneq", query=q[:1], db=db)
    with pytest.raises(CSAInputError, match="oneq.pkl.*1 rows but 2"):
        load_test_features(root, "toy", "oneq")
    for broken, fact in (({"easy": [0.0], "hard": [], "junk": []}, "integer"),
                         ({"easy": [40], "hard": [], "junk": []}, "outside"),
                         ({"easy": [-3], "hard": [], "junk": []}, "outside")):
        save_gnd(root, "bad", {**TOY_GND, "gnd": [broken, TOY_GND["gnd"][1]]})
        with pytest.raises(CSAInputError, match=fact):
            load_gnd(root, "bad")
    save_gnd(root, "bad", {**TOY_GND, "gnd": TOY_GND["gnd"][:1]})
    with pytest.raises(CSAInputError, match="1 queries but there are 2"):
        load_gnd(root, "bad")


@pytest.mark.parametrize("field, value", [
    ("base_lr", float("nan")), ("base_lr", -1.0), ("warmup_lr", 0.0), ("temperature", 0.0), ("drop_rate", 1.5),
    ("attn_drop_rate", 1.0), ("num_workers", -1), ("num_epochs", 0), ("device", "tpu"), ("num_heads", 0),
])
def test_training_settings_that_cannot_learn_are_refused_before_any_work(tmp_path, field, value):
    config = tiny_config(tmp_path / "absent", **{"output_dir": str(tmp_path / "run"), field: value})
    with pytest.raises(CSAInputError, match="--" + field.replace("_", "-")):
        run_training(config)
    assert not (tmp_path / "run").exists()


def test_non_finite_training_features_and_losses_stop_training(tmp_path):
    write_toy_trainset(tmp_path)
    path = tmp_path / "train" / TOY_TRAINSET / "toyfeat.pkl"
    feats = load_pickle(path)
    feats["train"][7, 3] = np.nan
    with open(path, "wb") as f:
        pickle.dump(feats, f)
    with pytest.raises(CSAInputError, match="training features 'toyfeat'.*NaN"):
        run_training(tiny_config(tmp_path, num_epochs=2))
    assert not (tmp_path / "run" / "checkpoint.pth").exists()

    class NaNLoss(torch.nn.Module):
        def forward(self, tokens, reconstruction, affinity, targets):
            nan = tokens.sum() * float("nan")
            return {"loss": nan, "contrastive": nan, "reconstruction": nan}

    model = RerankTransformer(anchor_len=4, embed_dim=8, depth=1, num_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{"affinity": torch.rand(2, 5, 4), "targets": torch.ones(2, 5)} for _ in range(30)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="10 iterations in a row"):
        train_one_epoch(model, NaNLoss(), batches, optimizer, None, "cpu", progress=False)
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="3 iterations"):
        train_one_epoch(model, NaNLoss(), batches[:3], optimizer, None, "cpu", progress=False)  # a short epoch
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoints_with_non_finite_weights_are_neither_written_nor_used(root, capsys):
    model = RerankTransformer(anchor_len=8, embed_dim=16, num_heads=2)
    good = (root / "model.pth").read_bytes()
    with torch.no_grad():
        model.topk_proj.weight[0, 0] = float("nan")
    with pytest.raises(CSAInputError, match="not finite"):
        save_checkpoint(root / "model.pth", model, epoch=2)
    assert (root / "model.pth").read_bytes() == good                 # the earlier file is kept
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, root / "official-nan.pth")  # official format
    code = csa_main(["rerank", "--data-root", str(root), "--dataset", "toy", "--features", "feat",
                     "--checkpoint", str(root / "official-nan.pth"), "--topk", "16", "--num-heads", "2"])
    assert code == 2
    out = capsys.readouterr()
    assert "CSA" not in out.out and "official-nan.pth" in out.err and "non-finite" in out.err


def test_official_checkpoint_head_count_can_be_given_and_is_never_assumed_silently(root, capsys):
    torch.manual_seed(3)
    trained = RerankTransformer(anchor_len=8, embed_dim=24, num_heads=6).eval()
    torch.save({"epoch": 100, "state_dict": trained.state_dict()}, root / "official.pth")   # no config
    affinity = torch.rand(2, 17, 8)
    with pytest.warns(UserWarning, match="num_heads=12.*assumed"):
        assumed = load_model(root / "official.pth")
    given = load_model(root / "official.pth", num_heads=6)
    torch.testing.assert_close(given.score(affinity), trained.score(affinity))
    assert not torch.allclose(assumed.score(affinity), trained.score(affinity))
    with pytest.raises(CSAInputError, match="num_heads=4 was requested.*num_heads=2"):  # a csa train file records it
        load_model(root / "model.pth", num_heads=4)
    args = ["rerank", "--data-root", str(root), "--dataset", "toy", "--features", "feat", "--topk", "16"]
    with pytest.warns(UserWarning, match="assumed"):
        assert csa_main(args + ["--checkpoint", str(root / "official.pth")]) == 0
    assert csa_main(args + ["--checkpoint", str(root / "official.pth"), "--num-heads", "6"]) == 0


def test_precision_at_zero_is_refused():
    q, db = toy_descriptors()
    with pytest.raises(CSAInputError, match="kappas"):
        evaluate_revisited(first_stage(q, db), TOY_GND, kappas=[0])
    with pytest.raises(CSAInputError, match="kappas"):
        compute_map(first_stage(q, db), [{"ok": [0]}, {"ok": [10]}], kappas=[1, -5])


# --------------------------------------------------------------------------------------------
# lost work and partial files
# --------------------------------------------------------------------------------------------
def test_output_locations_are_checked_before_the_work(root, capsys):
    args = ["rerank", "--data-root", str(root), "--dataset", "toy", "--features", "feat",
            "--checkpoint", str(root / "model.pth"), "--topk", "16"]
    (root / "a-folder").mkdir()
    (root / "a-file").write_text("keep me")
    for output, fact in ((root / "a-folder", "is a folder"), (root / "a-file" / "ranks.npy", "a-file")):
        assert csa_main(args + ["--output", str(output)]) == 2
        out = capsys.readouterr()
        assert "first stage" not in out.out and fact in out.err        # refused before any ranking
    assert (root / "a-file").read_text() == "keep me"
    assert csa_main(["train", "--data-root", str(root), "--output-dir", str(root / "a-file")]) == 2
    assert "--output-dir" in one_error_line(capsys, "train")


def test_a_read_only_cache_falls_back_to_the_output_folder(tmp_path):
    write_toy_trainset(tmp_path)
    (tmp_path / "cache").write_text("not a folder: <data_root>/cache cannot be written")
    with pytest.warns(UserWarning, match="--cache-dir"):
        run_training(tiny_config(tmp_path, num_epochs=1, warmup_epochs=0))
    assert list((tmp_path / "run" / "cache").glob("neighbours_*.pkl"))
    with pytest.raises(CSAInputError, match="--cache-dir"):   # an explicit --cache-dir is never replaced
        run_training(tiny_config(tmp_path, "run2", num_epochs=1, warmup_epochs=0, cache_dir=str(tmp_path / "cache")))


# --------------------------------------------------------------------------------------------
# unsafe or unverified loads
# --------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_run_nothing(root):
    marker = root / "pwned"
    with open(root / "annotations" / "toy" / "gnd_toy.pkl", "wb") as f:
        pickle.dump({**TOY_GND, "x": _Payload(marker)}, f)
    with pytest.raises(PickleRefused, match="gnd_toy.pkl.*system"):
        load_gnd(root, "toy")
    with pytest.raises(PickleRefused):
        load_test_features(root, "toy", "feat")     # reads the ground truth to check the row counts
    assert not marker.exists()


def test_damaged_checkpoints_are_refused_by_name(root):
    data = bytearray((root / "model.pth").read_bytes())
    weights = bytes(load_checkpoint(root / "model.pth")["state_dict"]["topk_proj.weight"].numpy().tobytes())
    at = data.find(weights[:64])
    assert at > 0
    data[at + 8: at + 12] = b"\x7f\x7f\x7f\x7f"                  # random bytes inside one weight tensor
    (root / "flipped.pth").write_bytes(bytes(data))
    with pytest.raises(CSAInputError, match="flipped.pth.*digest"):
        load_model(root / "flipped.pth")
    (root / "empty.pth").write_bytes(b"")
    with pytest.raises(CSAInputError, match="empty.pth.*empty"):
        load_model(root / "empty.pth")


# --------------------------------------------------------------------------------------------
# the command line: one line, an exit status, no traceback
# --------------------------------------------------------------------------------------------
def _cli_cases(root: Path) -> list[tuple[list[str], str, str]]:
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (root / "text.npy").write_text("1 2 3\n")
    (root / "a-file").write_text("x")
    (root / "broken.ipynb").write_text("{ not json")
    data = ["--data-root", str(root), "--dataset", "toy", "--features", "feat"]
    train = ["train", "--data-root", str(root), "--output-dir", str(root / "run")]
    return [
        (["demo", "extract", "--root", str(root / "missing")], "demo", "missing"),
        (["demo", "build", "--source", str(root / "missing"), "--out", str(root / "demo")], "demo", "--source"),
        (["extract", "demo", "--data-root", str(root), "--scales", "abc"], "extract", "--scales"),
        (["rerank", *data, "--checkpoint", str(root / "model.pth"), "--device", "tpu"], "rerank", "tpu"),
        (["evaluate", *data, "--ranks", str(root / "absent.npy")], "evaluate", "absent.npy"),
        (["evaluate", *data, "--ranks", str(root / "objects.npy")], "evaluate", "object"),
        (["evaluate", *data, "--ranks", str(root / "text.npy")], "evaluate", "not a .npy"),
        ([*train, "--device", "tpu"], "train", "--device"),
        ([*train, "--temperature", "0"], "train", "--temperature"),
        ([*train, "--drop-rate", "1.5"], "train", "--drop-rate"),
        ([*train, "--base-lr", "-1"], "train", "--base-lr"),
        ([*train, "--num-workers", "-1"], "train", "--num-workers"),
        (["train", "--data-root", str(root), "--output-dir", str(root / "a-file")], "train", "--output-dir"),
        (["batch", str(root / "broken.ipynb"), "--out", str(root / "batch")], "batch", "broken.ipynb"),
        (["download", "gnd", "--data-root", str(root), "--mirror", "notaurl"], "download", "notaurl"),
    ]


def test_every_command_reports_bad_input_in_one_line(root, capsys):
    before = None
    for argv, command, fact in _cli_cases(root):
        before = files_under(root) if before is None else before
        code = csa_main(argv)
        err = one_error_line(capsys, command)
        assert code == 2, (argv, err)
        assert fact in err, (argv, err)
    assert files_under(root) == before                     # nothing written, nothing replaced
    assert not (root / "run").exists() and not (root / "batch").exists()


def test_a_corrupt_extraction_shard_is_extracted_again(tmp_path):
    from csa.descriptors.extract import extract_descriptors

    class Net(torch.nn.Module):
        meta = {"mean": [0.0] * 3, "std": [1.0] * 3, "outputdim": 3}

        def forward(self, x):
            return torch.nn.functional.normalize(x.mean(dim=(2, 3)) + 1.0, dim=1)

    from PIL import Image
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    shards = tmp_path / "shards"
    full = extract_descriptors(Net(), paths, image_size=None, shard_dir=shards, shard_size=2, progress=False,
                               device="cpu")
    (shards / "descriptors.npy").unlink()
    first = sorted(shards.glob("shard_*.npy"))[0]
    first.write_bytes(first.read_bytes()[:40])                  # a shard cut short by a crash
    with pytest.warns(UserWarning, match="damaged extraction shard"):
        again = extract_descriptors(Net(), paths, image_size=None, shard_dir=shards, shard_size=2, progress=False,
                                     device="cpu")
    np.testing.assert_array_equal(again, full)
    shutil.rmtree(shards)
