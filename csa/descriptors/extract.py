"""Global descriptor extraction from image files (single- or multi-scale), resumable through shards.

Image preparation follows cirtorch's test pipeline: load RGB, crop a query to its bounding box, shrink
(never enlarge) with Lanczos so that the *full* image's long side would be ``image_size``, convert to
[0, 1] and normalize with ``net.meta['mean'/'std']``.  The crop uses the full image's scale factor, so a
query region is seen at the database's scale (cirtorch's thumbnail of the crop agrees whenever the
image is not larger than ``image_size``, e.g. 1024-px images at ``image_size=1024``).
Multi-scale: ``l2n(mean_s net(interp(x, s))^msp)^(1/msp)`` with bilinear interpolation, as cirtorch's
``extract_ms`` (msp = 1 for whitened networks).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from csa.descriptors.pooling import l2n
from csa.fileio import atomic_write, fingerprint, remove_stale_temporaries
from csa.validation import CSAInputError

__all__ = ["ImageListDataset", "load_image_tensor", "extract_descriptors", "extraction_fingerprint", "parse_scales"]


def load_image_tensor(path: str | os.PathLike, image_size: int | None, bbx: Sequence[float] | None,
                      mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Read one image as a normalized (3, H, W) float32 tensor (crop to ``bbx``, shrink to ``image_size``)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img = img.convert("RGB")
    full_long = max(img.size)
    if bbx is not None:
        x1, y1, x2, y2 = (float(v) for v in bbx)
        if not (x2 > x1 and y2 > y1):
            raise CSAInputError(f"bounding box {tuple(bbx)} of {path} is empty; boxes are [x1, y1, x2, y2]")
        img = img.crop((round(x1), round(y1), round(x2), round(y2)))
    if image_size is not None and full_long > image_size:
        scale = image_size / full_long
        w, h = img.size
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


class ImageListDataset(Dataset):
    """Images from a list of paths, optionally cropped to per-image boxes; yields (index, tensor)."""

    def __init__(self, image_paths: Sequence[str | os.PathLike], image_size: int | None,
                 mean: Sequence[float], std: Sequence[float], bbxs: Sequence[Sequence[float] | None] | None = None):
        self.paths = [str(p) for p in image_paths]
        self.bbxs = list(bbxs) if bbxs is not None else None
        self.image_size, self.mean, self.std = image_size, list(mean), list(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        bbx = self.bbxs[i] if self.bbxs is not None else None
        return i, load_image_tensor(self.paths[i], self.image_size, bbx, self.mean, self.std)


def _collate_list(batch):
    return batch


def _read_shard(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A finished shard (or the merged file) with the expected ``shape``; None when it is absent or
    unreadable (a damaged shard is deleted with a warning and extracted again)."""
    if not path.exists():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
        if arr.shape == shape and arr.dtype == np.float32 and np.isfinite(arr).all():
            return arr
        problem = f"shape {arr.shape} dtype {arr.dtype}, expected {shape} float32 finite values"
    except (ValueError, OSError, EOFError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"ignoring damaged extraction shard {path} ({problem}); extracting it again", stacklevel=3)
    path.unlink(missing_ok=True)
    return None


def parse_scales(text: str, name: str = "scales") -> list[float]:
    """``"1,0.7071,1.4142"`` -> ``[1.0, 0.7071, 1.4142]``; anything but positive numbers is refused, naming
    ``name`` (the flag or notebook parameter it came from)."""
    try:
        values = [float(s) for s in str(text).split(",")]
    except ValueError as exc:
        raise CSAInputError(f"{name} must be comma-separated numbers such as 1,0.7071,1.4142, got {text!r}") from exc
    if any(not v > 0 for v in values):
        raise CSAInputError(f"{name} must be positive, got {text!r}")
    return values


def extraction_fingerprint(image_paths: Sequence[str | os.PathLike], image_size: int | None,
                           scales: Sequence[float], bbxs=None, msp: float = 1.0, net_name: str = "") -> str:
    """Hash of what determines the descriptors: image names, boxes, size, scales, msp and network name."""
    return fingerprint({"images": [os.path.basename(str(p)) for p in image_paths], "image_size": image_size,
                        "scales": [float(s) for s in scales], "msp": float(msp), "net": net_name,
                        "bbxs": None if bbxs is None else [None if b is None else [float(v) for v in b] for b in bbxs]})


@torch.no_grad()
def _describe(net: torch.nn.Module, x: torch.Tensor, scales: Sequence[float], msp: float) -> torch.Tensor:
    """Descriptors (B, D) of a same-size batch (B, 3, H, W), averaged over scales."""
    if len(scales) == 1 and scales[0] == 1:
        return net(x)
    acc = None
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        v = net(xs).pow(msp)
        acc = v if acc is None else acc + v
    return l2n((acc / len(scales)).pow(1.0 / msp))


def _extract_range(net, dataset, indices, scales, msp, batch_size, num_workers, device, bar) -> np.ndarray:
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_list)
    out = np.zeros((len(indices), int(net.meta["outputdim"])), dtype=np.float32)
    pos = {idx: k for k, idx in enumerate(indices)}
    for batch in loader:
        groups: dict[tuple, list] = {}
        for i, x in batch:  # images differ in size: forward each group of equal size together
            groups.setdefault(tuple(x.shape), []).append((i, x))
        for items in groups.values():
            xb = torch.stack([x for _, x in items]).to(device)
            v = _describe(net, xb, scales, msp).float().cpu().numpy()
            for (i, _), row in zip(items, v):
                out[pos[i]] = row
        if bar is not None:
            bar.update(len(batch))
    return out


def extract_descriptors(net: torch.nn.Module, image_paths: Sequence[str | os.PathLike], image_size: int | None = 512,
                        scales: Sequence[float] = (1,), bbxs: Sequence[Sequence[float] | None] | None = None,
                        batch_size: int = 8, num_workers: int = 0, shard_dir: str | os.PathLike | None = None,
                        shard_size: int = 256, msp: float = 1.0, device: str | torch.device | None = None,
                        progress: bool = True) -> np.ndarray:
    """Extract L2-normalized global descriptors, one row per image: (N, D) float32.

    ``net`` maps a normalized batch to (B, D) rows and has ``meta['mean'/'std'/'outputdim']`` (see
    :mod:`csa.descriptors.networks`).  ``bbxs`` crops each image first (queries).  With ``shard_dir``, results are
    written in shards of ``shard_size`` images; finished shards are skipped on a rerun (resume after an
    interruption; a damaged shard is extracted again) and the merged array is written there atomically
    as ``descriptors.npy``.  A shard dir filled for other images/parameters is refused.
    """
    paths = [str(p) for p in image_paths]
    if len(paths) == 0:
        raise CSAInputError("image_paths is empty; pass at least one image")
    if bbxs is not None and len(bbxs) != len(paths):
        raise CSAInputError(f"bbxs has {len(bbxs)} boxes for {len(paths)} images; pass one box (or None) per image")
    scales = [float(s) for s in scales]
    if not scales or any(s <= 0 for s in scales):
        raise CSAInputError(f"scales must be positive numbers, got {scales}")
    if batch_size < 1 or shard_size < 1:
        raise CSAInputError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    for key in ("mean", "std", "outputdim"):
        if key not in getattr(net, "meta", {}):
            raise CSAInputError(f"net.meta lacks {key!r}; build the network with csa.descriptors.backbones.load_backbone")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CSAInputError(f"{len(missing)} image file(s) not found, e.g. {missing[0]}; check the data root")
    if device is None:
        device = next(net.parameters()).device
    net = net.to(device).eval()
    dataset = ImageListDataset(paths, image_size, net.meta["mean"], net.meta["std"], bbxs)
    bar = tqdm(total=len(paths), desc="descriptors", unit="img", disable=not progress)
    try:
        if shard_dir is None:
            return _extract_range(net, dataset, range(len(paths)), scales, msp, batch_size, num_workers, device, bar)
        shard_dir = Path(shard_dir)
        shard_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(shard_dir)  # one extraction owns its shard folder
        fp = extraction_fingerprint(paths, image_size, scales, bbxs, msp, str(net.meta.get("architecture", "")))
        fp_file = shard_dir / "fingerprint.txt"
        if fp_file.exists() and fp_file.read_text().strip() != fp:
            raise CSAInputError(f"{shard_dir} holds shards of another extraction (other images or parameters); "
                                f"use a new shard_dir or delete that one")
        if not fp_file.exists():
            with atomic_write(fp_file, "w") as f:
                f.write(fp)
        dim = int(net.meta["outputdim"])
        merged = _read_shard(shard_dir / "descriptors.npy", (len(paths), dim))
        if merged is not None:
            bar.update(len(paths))
            return merged
        merged = shard_dir / "descriptors.npy"
        parts = []
        for k, start in enumerate(range(0, len(paths), shard_size)):
            stop = min(start + shard_size, len(paths))
            shard = shard_dir / f"shard_{k:05d}_{start}_{stop}.npy"
            done = _read_shard(shard, (stop - start, dim))
            if done is not None:
                parts.append(done)
                bar.update(stop - start)
                continue
            arr = _extract_range(net, dataset, range(start, stop), scales, msp, batch_size, num_workers, device, bar)
            with atomic_write(shard, "wb") as f:
                np.save(f, arr)
            parts.append(arr)
        out = np.concatenate(parts, axis=0)
        with atomic_write(merged, "wb") as f:
            np.save(f, out)
        return out
    finally:
        bar.close()
