"""Datasets as in-memory uint8 tensors, batched by indexing, augmented on whole batches on the training device.

Real datasets are read with torchvision's dataset classes and idx readers. Files are looked for in this order:

1. ``data_dir`` (the CLI's ``--data-dir``) or ``$ROBUSTCNN_DATA``: when given, that folder is the only place
   looked in, and a download (if allowed) goes there;
2. otherwise the user cache (``$XDG_CACHE_HOME/robustcnn``, default ``~/.cache/robustcnn``), then the Debian
   dataset folder ``/usr/share/datasets/<name>`` (package ``dataset-fashion-mnist``), then a torchvision
   download into the cache.

If all of that fails, :class:`DataNotFoundError` says in one line how to get the files.

Idx files (Fashion-MNIST, MNIST) are checked before use: the size their header announces must be their size, and
a file of the published size must have the published SHA-256 (:data:`IDX_FILES`); a file that fails gets a one-line
error naming it and what is wrong. A ``.gz`` file is decompressed once into the cache, in a folder of its own keyed
by the source file's identity (resolved path, size, modification time), so a bad source never stands in for a good
one. CIFAR-10 and SVHN are read by torchvision, which checks their published MD5 sums itself.
``shapes`` is generated procedurally (no files): a quick, deterministic dataset for demos and tests.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import struct
import os
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from robustcnn.errors import DataNotFoundError, check_choice
from robustcnn.fsutil import atomic_write

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "svhn", "shapes")
DEBIAN_ROOT = Path("/usr/share/datasets")


@dataclass(frozen=True)
class ImageData:
    """A labelled image dataset held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, count: int | None) -> "ImageData":
        """The first ``count`` images (all of them when ``count`` is None)."""
        if count is None or count >= len(self):
            return self
        return ImageData(self.images[:count], self.labels[:count], self.classes, self.name)

    def to(self, device: torch.device | str) -> "ImageData":
        """The same data on ``device`` (still uint8: 1 byte per pixel)."""
        return ImageData(self.images.to(device), self.labels.to(device), self.classes, self.name)


@dataclass(frozen=True)
class _Spec:
    """How to find one dataset: the torchvision class, the raw idx file stem, whether flipping is sensible."""

    tv_class: str
    flip: bool
    idx: bool = False
    hint: str = ""


_SPECS: dict[str, _Spec] = {
    "fashion-mnist": _Spec("FashionMNIST", flip=True, idx=True, hint="install the Debian package dataset-fashion-mnist"),
    "mnist": _Spec("MNIST", flip=False, idx=True),
    "cifar10": _Spec("CIFAR10", flip=True),
    "svhn": _Spec("SVHN", flip=False),
}


#: The published idx files, decompressed: size in bytes and SHA-256 (None where not recorded here). A file of the
#: published size is the full split and must match its SHA-256; smaller files (subsets, test fixtures) that are
#: consistent with their header are accepted.
IDX_FILES: dict[str, dict[str, tuple[int, str | None]]] = {
    "FashionMNIST": {
        "train-images-idx3-ubyte": (47_040_016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train-labels-idx1-ubyte": (60_008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "t10k-images-idx3-ubyte": (7_840_016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "t10k-labels-idx1-ubyte": (10_008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    "MNIST": {
        "train-images-idx3-ubyte": (47_040_016, None),
        "train-labels-idx1-ubyte": (60_008, None),
        "t10k-images-idx3-ubyte": (7_840_016, None),
        "t10k-labels-idx1-ubyte": (10_008, None),
    },
}


def cache_dir() -> Path:
    """The user cache: ``$XDG_CACHE_HOME/robustcnn`` or ``~/.cache/robustcnn``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robustcnn"


def horizontal_flip_is_sensible(name: str) -> bool:
    """Mirroring keeps the label for clothes, objects and shapes, not for digits."""
    return name == "shapes" or _SPECS[check_choice("dataset", name, DATASETS)].flip


def load_dataset(name: str, *, train: bool, data_dir: str | Path | None = None, download: bool = True) -> ImageData:
    """Load the train or test split of dataset ``name`` into memory (see the module docstring for where from)."""
    name = check_choice("dataset", name, DATASETS)
    if name == "shapes":
        return make_shapes(12_000 if train else 2_000, seed=1 if train else 2)
    explicit = data_dir if data_dir is not None else os.environ.get("ROBUSTCNN_DATA") or None
    spec = _SPECS[name]
    if explicit is not None:
        folders, target = [Path(explicit).expanduser()], Path(explicit).expanduser()
    else:
        folders, target = [cache_dir(), DEBIAN_ROOT / name], cache_dir()
    for folder in folders:
        found = _read_local(spec, folder, train)
        if found is not None:
            return _image_data(name, *found)
    why = "downloads are off"
    if download:
        try:
            return _image_data(name, *_download(spec, target, train))
        except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ... when offline
            why = f"download failed ({_first_line(exc)})"
    hint = f"{spec.hint}, or " if spec.hint and explicit is None else ""
    raise DataNotFoundError(
        f"{name} not found in {', '.join(map(str, folders))} and {why}: {hint}"
        f"pass --data-dir DIR (or set $ROBUSTCNN_DATA) to a folder with the {spec.tv_class} files"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _image_data(name: str, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> ImageData:
    """Normalise torchvision's layouts (N, H, W) / (N, H, W, C) / (N, C, H, W) to uint8 NCHW."""
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return ImageData(images.contiguous().to(torch.uint8), labels, tuple(classes), name)


def _tv_dataset(spec: _Spec, root: Path, train: bool, download: bool):
    """Instantiate the torchvision dataset class (no transforms; we only read its arrays)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.tv_class)
    if spec.tv_class == "SVHN":
        return cls(str(root), split="train" if train else "test", download=download)
    return cls(str(root), train=train, download=download)


def _arrays(ds) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    labels = getattr(ds, "targets", None)
    if labels is None:  # SVHN
        labels = ds.labels
    classes = list(getattr(ds, "classes", None) or [str(i) for i in range(10)])
    return torch.as_tensor(ds.data), torch.as_tensor(labels), classes


def _read_local(spec: _Spec, folder: Path, train: bool):
    """Read the split from ``folder`` if its files are there, else None."""
    if spec.idx:
        files = _find_idx_files(spec, folder, train)
        if files is None:
            return None
        try:
            return _read_idx(spec, *files)
        except (AssertionError, EOFError, OSError, RuntimeError, ValueError) as exc:
            raise DataNotFoundError(
                f"{files[0].parent} holds unreadable {spec.tv_class} files ({_first_line(exc)}): replace or delete them"
            ) from None
    try:
        return _arrays(_tv_dataset(spec, folder, train, download=False))
    except (RuntimeError, OSError):  # torchvision: "Dataset not found or corrupted"
        return None


def _idx_names(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx_files(spec: _Spec, folder: Path, train: bool) -> tuple[Path, Path] | None:
    """The image and label idx files (plain or .gz) in ``folder`` or torchvision's ``folder/<Class>/raw``."""
    for place in (folder / spec.tv_class / "raw", folder):
        found = []
        for stem in _idx_names(train):
            candidates = [place / stem, place / f"{stem}.gz"]
            found.append(next((p for p in candidates if p.is_file()), None))
        if all(found):
            return found[0], found[1]
    return None


def _read_idx(spec: _Spec, images: Path, labels: Path):
    """Read checked idx files with torchvision's readers; .gz files are decompressed once into the cache."""
    import torchvision.datasets as tvd
    from torchvision.datasets import mnist as tv_mnist

    with tempfile.TemporaryDirectory() as spare:
        x = tv_mnist.read_image_file(str(_plain(images, spec, Path(spare))))
        y = tv_mnist.read_label_file(str(_plain(labels, spec, Path(spare))))
    classes = getattr(tvd, spec.tv_class).classes  # MNIST's read "0 - zero": keep the digit
    return x, y, [c.split(" - ")[0] for c in classes]


class _CorruptFile(ValueError):
    """An idx file that fails its checks; the message says what is wrong."""


class _Digest:
    """Size, SHA-256 and the first 16 bytes (the idx header) of what is written through it."""

    def __init__(self, sink=None):
        self.sink, self.size, self.sha, self.head = sink, 0, hashlib.sha256(), b""

    def write(self, data: bytes) -> int:
        if self.sink is not None:
            self.sink.write(data)
        self.sha.update(data)
        self.head += data[: max(0, 16 - len(self.head))]
        self.size += len(data)
        return len(data)


def _check_digest(spec: _Spec, name: str, digest: _Digest) -> None:
    """Raise :class:`_CorruptFile` unless ``digest`` fits its idx header and, at the published size, its SHA-256."""
    dims = 3 if "images" in name else 1
    if len(digest.head) < 4 + 4 * dims:
        raise _CorruptFile(f"size mismatch ({digest.size} bytes, shorter than an idx header)")
    sizes = struct.unpack(f">{dims}I", digest.head[4 : 4 + 4 * dims])
    announced = 4 + 4 * dims + math.prod(sizes)
    if digest.size != announced:
        raise _CorruptFile(f"size mismatch ({digest.size:,} bytes, its header announces {announced:,}: truncated?)")
    published, sha = IDX_FILES[spec.tv_class].get(name, (None, None))
    if digest.size == published and sha is not None and digest.sha.hexdigest() != sha:
        raise _CorruptFile(f"checksum mismatch (its SHA-256 is not the published {spec.tv_class} file's)")


def _unreadable(path: Path, why: str) -> DataNotFoundError:
    return DataNotFoundError(f"{path} is unreadable: {why}; replace or delete it")


def _source_key(path: Path) -> str:
    """The identity of a source file: its resolved path, size and modification time, hashed."""
    stat = path.stat()
    ident = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _plain(path: Path, spec: _Spec, spare: Path) -> Path:
    """A checked, uncompressed copy of ``path``: itself, or its decompression in the cache (``spare`` if the cache
    is not writable). The cache folder is keyed by the source (:func:`_source_key`) and a copy is written only
    after it passed its checks, so an existing copy is the checked decompression of exactly this source."""
    if path.suffix != ".gz":
        digest = _Digest()
        with open(path, "rb") as source:
            shutil.copyfileobj(source, digest, 1 << 20)
        try:
            _check_digest(spec, path.name, digest)
        except _CorruptFile as exc:
            raise _unreadable(path, str(exc)) from None
        return path
    for folder in (cache_dir() / "decompressed" / spec.tv_class / _source_key(path), spare):
        out = folder / path.stem
        if out.is_file():
            return out
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "rb") as source:
                atomic_write(out, lambda target: _decompress_checked(source, target, spec, path.stem))
            return out
        except (_CorruptFile, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise _unreadable(path, str(exc) if isinstance(exc, _CorruptFile) else
                              f"not a complete gzip file ({_first_line(exc)})") from None
        except OSError:  # cache not writable: decompress into the spare folder instead
            continue
    raise DataNotFoundError(f"cannot decompress {path}")


def _decompress_checked(source, target, spec: _Spec, name: str) -> None:
    digest = _Digest(target)
    shutil.copyfileobj(source, digest, 1 << 20)
    _check_digest(spec, name, digest)


def _download(spec: _Spec, root: Path, train: bool):
    """Download with torchvision into ``root``; its progress messages go to stderr, never to stdout."""
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        ds = _tv_dataset(spec, root, train, download=True)
    return _arrays(ds)


# ----------------------------------------------------------------------------------------------------------------
# shapes: a procedurally generated dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")


def make_shapes(count: int, *, seed: int = 0, image_size: int = 32) -> ImageData:
    """``count`` RGB images of one shape each (see ``SHAPES``) with random colours, position, scale and noise.

    Deterministic for a given ``seed``; fully vectorized (about a second for 10,000 images of 32x32).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(SHAPES), (count,), generator=g)
    size = float(image_size)
    radius = (0.18 + 0.17 * torch.rand(count, generator=g)) * size  # half the shape's extent, in pixels
    centre = size / 2 + (torch.rand(count, 2, generator=g) - 0.5) * (size - 2 * radius[:, None])
    axis = torch.arange(image_size, dtype=torch.float32) + 0.5
    dx = (axis.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1)) / radius.view(-1, 1, 1)
    dy = (axis.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)) / radius.view(-1, 1, 1)
    mask = torch.zeros(count, 1, image_size, image_size, dtype=torch.bool)
    for k, inside in enumerate(_SHAPE_TESTS):  # each pixel is tested against its own image's shape only
        chosen = labels == k
        mask[chosen, 0] = inside(dx[chosen], dy[chosen])
    background = torch.randint(0, 115, (count, 3, 1, 1), generator=g, dtype=torch.int16)
    foreground = torch.randint(140, 256, (count, 3, 1, 1), generator=g, dtype=torch.int16)
    swap = torch.rand(count, 1, 1, 1, generator=g) < 0.5  # dark shapes on light ground too
    background, foreground = torch.where(swap, foreground, background), torch.where(swap, background, foreground)
    noise = (torch.randn(count, 1, image_size, image_size, generator=g) * 10).to(torch.int16)
    images = (torch.where(mask, foreground, background) + noise).clamp_(0, 255).to(torch.uint8)
    return ImageData(images, labels, SHAPES, "shapes")


def _radius(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(dx**2 + dy**2)


#: Inside-tests of every shape, in ``SHAPES`` order, on coordinates scaled so that the shape's radius is 1.
_SHAPE_TESTS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    lambda dx, dy: _radius(dx, dy) <= 1,  # circle
    lambda dx, dy: torch.maximum(dx.abs(), dy.abs()) <= 0.8,  # square
    lambda dx, dy: (dy <= 0.7) & (dx.abs() <= (dy + 1) * 0.6),  # triangle, pointing up
    lambda dx, dy: ((dx.abs() <= 0.3) & (dy.abs() <= 1)) | ((dy.abs() <= 0.3) & (dx.abs() <= 1)),  # cross
    lambda dx, dy: (_radius(dx, dy) <= 1) & (_radius(dx, dy) >= 0.55),  # ring
    lambda dx, dy: dx.abs() + dy.abs() <= 1,  # diamond
)


# ----------------------------------------------------------------------------------------------------------------
# batches

def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of uint8 images in [0, 1] units, from 256-bin histograms (no float copy)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * values**2).sum() / n - mean**2
        means.append(round(float(mean), 6))
        stds.append(round(max(math.sqrt(max(float(var), 0.0)), 1e-3), 6))
    return means, stds


def to_float(images_uint8: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on ``device`` (the conversion runs after the 1-byte copy)."""
    x = images_uint8 if device is None else images_uint8.to(device, non_blocking=True)
    return x.to(torch.float32).div_(255)


def augment(images: torch.Tensor, *, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels, and (if ``flip``) a random horizontal flip, per image.

    Works on a whole batch (any dtype) on the batch's device; ``generator`` must live on that device.
    """
    n, _, h, w = images.shape
    if pad > 0:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=images.device)
        rows = (offsets[0, :, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (offsets[1, :, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator, device=images.device) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images
