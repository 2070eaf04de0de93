"""Global descriptor extraction from image files (single- or multi-scale), resumable through shards.

Image preparation follows cirtorch's test pipeline: load RGB, crop a query to its bounding box, shrink
(never enlarge) with Lanczos so that the *full* image's long side would be ``image_size``, convert to
[0, 1] and normalize with ``net.meta['mean'/'std']``.  The crop uses the full image's scale factor, so a
query region is seen at the database's scale (cirtorch's thumbnail of the crop agrees whenever the
image is not larger than ``image_size``, e.g. 1024-px images at ``image_size=1024``).
Multi-scale: ``l2n(mean_s net(interp(x, s))^msp)^(1/msp)`` with bilinear interpolation, as cirtorch's
``extract_ms`` (msp = 1 for whitened networks).

Shards (``shard_dir``) are named by image range and written atomically, so an interrupted run leaves only
complete shards and a rerun, with any number of processes, extracts only the missing ones; under torchrun
(``ranks``) each process extracts its own shards and rank 0 merges them (:mod:`csa.descriptors.distributed`).
"""
from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from csa.descriptors.distributed import Ranks, owned_shards, synchronize
from csa.descriptors.pooling import l2n
from csa.descriptors.shard_lock import ShardFolderLock
from csa.fileio import atomic_write, fingerprint, remove_stale_temporaries
from csa.progress import progress_bar
from csa.validation import CSAInputError

__all__ = ["ImageListDataset", "load_image_tensor", "extract_descriptors", "extraction_fingerprint", "parse_scales",
           "merge_shards", "shard_ranges", "shard_path"]


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
        """``(i, tensor)``, or ``(i, message)`` naming the file when it cannot be read as an image (the
        message reaches the extracting process whole, also from a loader worker)."""
        bbx = self.bbxs[i] if self.bbxs is not None else None
        try:
            return i, load_image_tensor(self.paths[i], self.image_size, bbx, self.mean, self.std)
        except CSAInputError as exc:
            return i, str(exc)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return i, f"cannot read image {self.paths[i]} ({type(exc).__name__}: {exc})"


def _collate_list(batch):
    return batch


def shard_ranges(n_images: int, shard_size: int) -> list[tuple[int, int]]:
    """The image ranges ``[start, stop)`` of the shards of ``n_images`` images."""
    return [(start, min(start + shard_size, n_images)) for start in range(0, n_images, shard_size)]


def shard_path(shard_dir: str | os.PathLike, k: int, start: int, stop: int) -> Path:
    """Shard ``k``'s file: named by its image range, so any number of processes finds the same shards."""
    return Path(shard_dir, f"shard_{k:05d}_{start}_{stop}.npy")


def _load_shard(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """``(array, "")`` for a complete file of ``shape`` float32 finite values, else ``(None, problem)``."""
    if not path.exists():
        return None, "missing"
    try:
        arr = np.load(path, allow_pickle=False)
        if arr.shape == shape and arr.dtype == np.float32 and np.isfinite(arr).all():
            return arr, ""
        return None, f"shape {arr.shape} dtype {arr.dtype}, expected {shape} float32 finite values"
    except (ValueError, OSError, EOFError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _read_shard(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A finished shard with the expected ``shape``; None when it is absent or unreadable (a damaged
    shard is deleted with a warning and extracted again)."""
    arr, problem = _load_shard(path, shape)
    if arr is None and problem != "missing":
        warnings.warn(f"ignoring damaged extraction shard {path} ({problem}); extracting it again", stacklevel=3)
        path.unlink(missing_ok=True)
    return arr


def merge_shards(shard_dir: str | os.PathLike, n_images: int, shard_size: int, dim: int) -> np.ndarray:
    """The (n_images, dim) rows of every shard in ``shard_dir``, in image order; a missing or damaged
    shard is refused, naming it."""
    parts = []
    for k, (start, stop) in enumerate(shard_ranges(n_images, shard_size)):
        path = shard_path(shard_dir, k, start, stop)
        arr, problem = _load_shard(path, (stop - start, dim))
        if arr is None:
            raise CSAInputError(f"cannot merge the shards in {shard_dir}: {path.name} (images {start} to {stop - 1}) "
                                f"is {'missing' if problem == 'missing' else 'damaged (' + problem + ')'}; run the "
                                f"same extraction again (it extracts missing and damaged shards again)")
        parts.append(arr)
    return np.concatenate(parts, axis=0)


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


def _extract_range(net, dataset, indices, scales, msp, batch_size, num_workers, device, bar,
                   where: str = "") -> np.ndarray:
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_list)
    out = np.zeros((len(indices), int(net.meta["outputdim"])), dtype=np.float32)
    pos = {idx: k for k, idx in enumerate(indices)}
    for batch in loader:
        groups: dict[tuple, list] = {}
        for i, x in batch:  # images differ in size: forward each group of equal size together
            if isinstance(x, str):
                raise CSAInputError(f"{x}{where}; replace or remove that image and run again (finished shards "
                                    f"are kept)")
            groups.setdefault(tuple(x.shape), []).append((i, x))
        for items in groups.values():
            xb = torch.stack([x for _, x in items]).to(device)
            v = _describe(net, xb, scales, msp).float().cpu().numpy()
            for (i, _), row in zip(items, v):
                out[pos[i]] = row
        if bar is not None:
            bar.update(len(batch))
    return out


def _check_arguments(net, paths, bbxs, scales, batch_size, shard_size) -> list[float]:
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
    return scales


def extract_descriptors(net: torch.nn.Module, image_paths: Sequence[str | os.PathLike], image_size: int | None = 512,
                        scales: Sequence[float] = (1,), bbxs: Sequence[Sequence[float] | None] | None = None,
                        batch_size: int = 8, num_workers: int = 0, shard_dir: str | os.PathLike | None = None,
                        shard_size: int = 256, msp: float = 1.0, device: str | torch.device | None = None,
                        progress: bool = True, ranks: Ranks | None = None,
                        desc: str = "descriptors") -> np.ndarray | None:
    """Extract L2-normalized global descriptors, one row per image: (N, D) float32.

    ``net`` maps a normalized batch to (B, D) rows and has ``meta['mean'/'std'/'outputdim']`` (see
    :mod:`csa.descriptors.networks`).  ``bbxs`` crops each image first (queries).  With ``shard_dir``, results are
    written in shards of ``shard_size`` images; finished shards are skipped on a rerun (resume after an
    interruption; a damaged shard is extracted again) and the merged array is written there atomically
    as ``descriptors.npy``.  A shard dir filled for other images/parameters is refused, and so is one that
    another running extraction holds (:mod:`csa.descriptors.shard_lock`).

    ``ranks`` (from :func:`csa.descriptors.distributed.join_extraction_group`, needs ``shard_dir``) splits the
    shards over the processes of a torchrun run: rank 0 returns the merged rows, the others None.
    ``progress`` shows a bar named ``desc`` (plain lines every ~25 s when stderr is not a terminal,
    :mod:`csa.progress`).
    """
    paths = [str(p) for p in image_paths]
    scales = _check_arguments(net, paths, bbxs, scales, batch_size, shard_size)
    if ranks is not None and shard_dir is None:
        raise CSAInputError("extraction over several processes needs a shard_dir that every process can read")
    if device is None:
        device = next(net.parameters()).device
    net = net.to(device).eval()
    dataset = ImageListDataset(paths, image_size, net.meta["mean"], net.meta["std"], bbxs)
    bar = progress_bar(total=len(paths), desc=desc, unit="img", disable=not progress)
    try:
        if shard_dir is None:
            return _extract_range(net, dataset, range(len(paths)), scales, msp, batch_size, num_workers, device, bar)
        fp = extraction_fingerprint(paths, image_size, scales, bbxs, msp, str(net.meta.get("architecture", "")))
        run = partial(_extract_range, net, dataset, scales=scales, msp=msp, batch_size=batch_size,
                      num_workers=num_workers, device=device, bar=bar,
                      where="" if ranks is None else f" (on {ranks.label()})")
        return _extract_sharded(run, Path(shard_dir), fp, len(paths), int(net.meta["outputdim"]), shard_size, ranks,
                                bar)
    finally:
        bar.close()


def _extract_sharded(run, shard_dir: Path, fp: str, n: int, dim: int, shard_size: int, ranks: Ranks | None,
                     bar) -> np.ndarray | None:
    """The shards this process owns (``run(indices)`` extracts rows), then the merge on rank 0."""
    main = ranks is None or ranks.is_main
    shard_dir.mkdir(parents=True, exist_ok=True)
    with ShardFolderLock(shard_dir, ranks) as lock:
        if main:
            remove_stale_temporaries(shard_dir)  # the folder is this run's now: a killed run's leftovers
        fp_file = shard_dir / "fingerprint.txt"
        if fp_file.exists() and fp_file.read_text().strip() != fp:
            raise CSAInputError(f"{shard_dir} holds shards of another extraction (other images or parameters); "
                                f"use a new shard_dir or delete that one")
        synchronize(ranks)  # nothing is written below before every rank checked the folder
        if main and not fp_file.exists():
            with atomic_write(fp_file, "w") as f:
                f.write(fp)
        merged_path = shard_dir / "descriptors.npy"
        merged, _ = _load_shard(merged_path, (n, dim))
        if merged is not None:
            bar.update(n)
            return merged if main else None
        ranges = shard_ranges(n, shard_size)
        for k in owned_shards(len(ranges), ranks):
            start, stop = ranges[k]
            shard = shard_path(shard_dir, k, start, stop)
            if _read_shard(shard, (stop - start, dim)) is not None:
                bar.update(stop - start)
                continue
            arr = run(range(start, stop))
            with atomic_write(shard, "wb") as f:
                np.save(f, arr)
        if not main:
            lock.release()
        synchronize(ranks)  # every shard is written
        if not main:
            return None
        out = merge_shards(shard_dir, n, shard_size, dim)
        with atomic_write(merged_path, "wb") as f:
            np.save(f, out)
        return out
