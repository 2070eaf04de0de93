"""Checkpoints (save/load, official format, clear errors) and the atomic file helpers in csa.fileio."""
import os
import pickle

import pytest
import torch

from csa.checkpoint import infer_config, load_model, load_state_dict_checked, save_checkpoint
from csa.fileio import atomic_write, load_pickle, save_pickle
from csa.model import RerankTransformer
from csa.validation import CSAInputError

SMALL = dict(anchor_len=16, embed_dim=32, depth=2, num_heads=4)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_roundtrip_keeps_config_epoch_and_extra(tmp_path):
    m = RerankTransformer(**SMALL, qkv_bias=False, mlp_ratio=2)
    path = tmp_path / "ck" / "model.pth"
    save_checkpoint(path, m, epoch=7, history=[1.0, 0.5])
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 7 and raw["history"] == [1.0, 0.5] and raw["config"] == m.config
    m2 = load_model(path)
    assert m2.config == m.config and _same_weights(m, m2) and not m2.training
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temp file left


def test_official_checkpoint_without_config(tmp_path):
    """Official files are {'epoch', 'state_dict'} (maybe with a DDP 'module.' prefix)."""
    m = RerankTransformer(anchor_len=24, embed_dim=40, depth=3, num_heads=5)
    sd = {"module." + k: v for k, v in m.state_dict().items()}
    torch.save({"epoch": 100, "state_dict": sd}, tmp_path / "official.pth")
    assert infer_config(m.state_dict(), num_heads=5) == dict(anchor_len=24, embed_dim=40, depth=3, num_heads=5,
                                                            qkv_bias=True, mlp_ratio=4)
    m2 = load_model(tmp_path / "official.pth", num_heads=5)
    assert m2.config["depth"] == 3 and m2.config["anchor_len"] == 24 and _same_weights(m, m2)
    # default num_heads is 12, which does not divide 48 -> clear error asking for num_heads
    with pytest.raises(CSAInputError, match="num_heads=12 does not divide embed_dim=40"):
        load_model(tmp_path / "official.pth")
    # a bare state dict also loads
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    assert _same_weights(m, load_model(tmp_path / "bare.pth", num_heads=5))


def test_wrong_anchor_len_request(tmp_path):
    save_checkpoint(tmp_path / "m.pth", RerankTransformer(**SMALL), epoch=1)
    with pytest.raises(CSAInputError, match="anchor_len=32 was requested .* trained with anchor_len=16"):
        load_model(tmp_path / "m.pth", anchor_len=32)
    with pytest.raises(CSAInputError, match="unknown model argument"):
        load_model(tmp_path / "m.pth", heads=4)


def test_mismatch_lists_keys_and_shapes():
    m = RerankTransformer(**SMALL)
    sd = dict(RerankTransformer(anchor_len=16, embed_dim=32, depth=1, num_heads=4, mlp_ratio=2).state_dict())
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CSAInputError) as e:
        load_state_dict_checked(m, sd)
    msg = str(e.value)
    assert "missing keys ['blocks.1.norm1.weight'" in msg
    assert "unexpected keys ['extra.weight']" in msg
    assert "blocks.0.mlp.fc1.weight: file (64, 32) vs model (128, 32)" in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_truncated_and_garbage_files(tmp_path):
    save_checkpoint(tmp_path / "m.pth", RerankTransformer(**SMALL), epoch=1)
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CSAInputError, match="cut.pth.*truncated, corrupt"):
        load_model(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CSAInputError, match="junk.pth"):
        load_model(tmp_path / "junk.pth")
    with pytest.raises(CSAInputError, match="no checkpoint file"):
        load_model(tmp_path / "absent.pth")
    # arbitrary pickled objects are refused by weights_only loading
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {}, "obj": RerankTransformer}, f)
    with pytest.raises(CSAInputError, match="evil.pth"):
        load_model(tmp_path / "evil.pth")


def test_atomic_write_failure_leaves_old_file(tmp_path):
    path = tmp_path / "a.pkl"
    save_pickle({"x": 1}, path)
    with pytest.raises(RuntimeError):
        with atomic_write(path, "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert load_pickle(path) == {"x": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.pkl"]
    with atomic_write(tmp_path / "t.txt", "w") as f:
        f.write("héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError):
        with atomic_write(path, "rb"):
            pass
