"""Data from anywhere: a built-in dataset, a folder of class sub-folders, or an ``.npz`` file of arrays.

:func:`load_data` returns the same :class:`~robustcnn.data.ImageData` (uint8 images (N, C, H, W) in memory, int64
labels, class names) the built-in datasets give, so every command can use it:

- a built-in name (``fashion-mnist``, ``shapes``, ...): :func:`robustcnn.data.load_dataset`;
- a folder in torchvision's ``ImageFolder`` layout, ``root/<class>/<image>``, or ``root/<split>/<class>/<image>``
  when ``root/<split>`` exists; class names are the sub-folder names (sorted, or in the order ``classes`` gives);
  the images are ordered round-robin over the classes (the first of every class, then the second, ...), so the
  first N images of any ``limit`` cover every class;
- an ``.npz`` file with ``x`` (N, H, W) or (N, H, W, C), uint8 or float in [0, 1], and integer ``y`` (N,)
  (``x_<split>``/``y_<split>`` when the file holds those); class names from ``classes``, else "0".."K-1".

``image_size`` resizes (bilinear with antialiasing) to a square of that many pixels; ``grayscale`` turns RGB into
one luminance channel (ITU-R 601 weights, as Pillow does). :func:`check_fit` says in one line what of a dataset
does not fit a model.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from robustcnn.data import DATASETS, ImageData, load_dataset, to_float
from robustcnn.errors import RobustCNNError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: Luminance weights of R, G and B (ITU-R 601-2), the ones Pillow's "L" conversion uses.
LUMA = (0.299, 0.587, 0.114)


class DataLoadError(RobustCNNError, ValueError):
    """A data folder or file cannot be used: empty, unreadable, or not in a layout robustcnn reads (exit 1)."""


def load_data(spec: str | Path, *, split: str = "test", limit: Optional[int] = None,
              image_size: Optional[int] = None, grayscale: bool = False,
              classes: str | Sequence[str] | None = None, data_dir: str | Path | None = None,
              require_split: bool = False) -> ImageData:
    """Load the images ``spec`` names (a built-in dataset, an image folder or an ``.npz`` file; see the module).

    ``split``: ``train`` or ``test`` for built-in datasets, a sub-folder or key suffix otherwise. ``limit``: keep
    the first that many images. ``classes``: a comma list or sequence of class names (folders: which sub-folders,
    in label order; ``.npz``: the names of labels 0..K-1). ``data_dir``: where built-in datasets are looked for.
    ``require_split``: a folder or file without that split is an error instead of being read whole (patches are
    trained on training images, never on the images they are measured on).
    """
    if limit is not None and limit <= 0:
        raise UsageError(f"limit must be > 0, got {limit}")
    if image_size is not None and image_size <= 0:
        raise UsageError(f"image_size must be > 0, got {image_size}")
    names = _class_list(classes)
    text = str(spec)
    path = Path(text).expanduser()
    if not path.exists() and text.strip().lower() in DATASETS:
        if split not in ("train", "test"):
            raise UsageError(f"built-in datasets have the splits train and test, not {split!r}")
        if names is not None:
            raise UsageError("classes apply to image folders and .npz files; built-in datasets name their own")
        data = load_dataset(text.strip().lower(), train=split == "train", data_dir=data_dir).subset(limit)
    elif require_split and path.exists() and not _has_split(path, split):
        raise DataLoadError(f"{path} has no {split} split (a {split}/ sub-folder, or x_{split} and y_{split} in an "
                            ".npz): it is needed apart from the images attacks are measured on")
    elif path.is_dir():
        data = _folder(path, split, limit, names, image_size)
    elif path.is_file() and zipfile.is_zipfile(path):
        data = _npz(path, split, limit, names)
    elif path.exists():
        raise DataLoadError(f"{path} is neither an image folder nor an .npz file")
    else:
        raise DataLoadError(f"data not found: {text} is no file or folder, and not a built-in dataset "
                            f"({', '.join(DATASETS)})")
    return _adapt(data, image_size, grayscale)


def _has_split(path: Path, split: str) -> bool:
    if path.is_dir():
        return (path / split).is_dir()
    try:
        return {f"x_{split}", f"y_{split}"} <= set(np.load(path, allow_pickle=False).files)
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def _class_list(classes: str | Sequence[str] | None) -> Optional[list[str]]:
    if classes is None:
        return None
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
    if not names or not all(names):
        raise UsageError(f"classes must be non-empty names, got {classes!r}")
    if len(set(names)) != len(names):
        raise UsageError(f"classes must be distinct, got {classes!r}")
    return names


def _adapt(data: ImageData, image_size: Optional[int], grayscale: bool) -> ImageData:
    """Resize to ``image_size`` and/or reduce to one channel; the data unchanged when nothing is asked."""
    images = data.images
    if grayscale and images.shape[1] == 3:
        images = _luma(images)
    if image_size is not None and images.shape[2:] != (image_size, image_size):
        images = _resize(images, image_size)
    return data if images is data.images else ImageData(images, data.labels, data.classes, data.name)


def _luma(images: Tensor) -> Tensor:
    weights = torch.tensor(LUMA).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


def _resize(images: Tensor, size: int) -> Tensor:
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# image folders

def _folder(root: Path, split: str, limit: Optional[int], names: Optional[list[str]],
            image_size: Optional[int]) -> ImageData:
    base = root / split if (root / split).is_dir() else root
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if names is None:
        names = found
    else:
        absent = [c for c in names if c not in found]
        if absent:
            raise DataLoadError(f"{base} has no class folder {', '.join(map(repr, absent))} (found: "
                                f"{', '.join(found) or 'none'})")
    files = [sorted(p for p in (base / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
             for c in names]
    if not names or not any(files):
        raise DataLoadError(f"{base} holds no images in class sub-folders (expected {base}/<class>/<image>.png)")
    order = [(label, group[i]) for i in range(max(map(len, files))) for label, group in enumerate(files)
             if i < len(group)]  # round-robin over the classes
    order = order[:limit] if limit is not None else order
    pictures = [_read_image(path) for _, path in order]
    if image_size is not None:  # one at a time: images of different sizes stack only once resized
        pictures = [_resize(p[None], image_size)[0] for p in pictures]
    sizes = {p.shape[1:] for p in pictures}
    if len(sizes) > 1:
        shown = sorted(f"{h}x{w}" for h, w in sizes)[:3]
        raise DataLoadError(f"the images in {base} have different sizes ({', '.join(shown)}): pass image_size "
                            "(--image-size) to resize them to one")
    channels = 3 if any(p.shape[0] == 3 for p in pictures) else 1
    images = torch.stack([p.expand(channels, -1, -1) for p in pictures])
    labels = torch.tensor([label for label, _ in order], dtype=torch.int64)
    return ImageData(images.contiguous(), labels, tuple(names), root.name)


def _read_image(path: Path) -> Tensor:
    """One image as uint8 (C, H, W): one channel if it is grayscale, else RGB (transparency dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            pixels = np.asarray(img.convert("L" if gray else "RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataLoadError(f"cannot read the image {path} ({str(exc).splitlines()[0][:120]})") from None
    tensor = torch.from_numpy(pixels.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------------
# .npz files

def _npz(path: Path, split: str, limit: Optional[int], names: Optional[list[str]]) -> ImageData:
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataLoadError(f"{path} is not a readable .npz file ({str(exc).splitlines()[0][:120]})") from None
    xk, yk = (f"x_{split}", f"y_{split}") if {f"x_{split}", f"y_{split}"} <= keys else ("x", "y")
    if not {xk, yk} <= keys:
        raise DataLoadError(f"{path} needs arrays 'x' (images) and 'y' (labels); it has "
                            f"{', '.join(sorted(keys)) or 'none'}")
    try:
        x, y = arrays[xk], arrays[yk]
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataLoadError(f"{path}: {xk}/{yk} must be numeric arrays ({str(exc).splitlines()[0][:120]})") from None
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return ImageData(_images(x, path, xk), _labels(y, len(x), path, yk, names), tuple(_names(y, names)), path.stem)


def _images(x: np.ndarray, path: Path, key: str) -> Tensor:
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 3:
        x = x[:, None]
    else:
        raise DataLoadError(f"{path}: {key} has shape {x.shape}; expected (N, H, W) or (N, H, W, C) with C 1 or 3")
    if len(x) == 0:
        raise DataLoadError(f"{path}: {key} holds no images")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise DataLoadError(f"{path}: float images in {key} must lie in [0, 1], found "
                                f"[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}]")
        return torch.from_numpy(np.ascontiguousarray(np.rint(x.astype(np.float64) * 255).astype(np.uint8)))
    raise DataLoadError(f"{path}: {key} has dtype {x.dtype}; expected uint8 or float in [0, 1]")


def _labels(y: np.ndarray, n: int, path: Path, key: str, names: Optional[list[str]]) -> Tensor:
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataLoadError(f"{path}: {key} must be {n} integer labels, got {y.dtype} {y.shape}")
    if y.min() < 0:
        raise DataLoadError(f"{path}: {key} holds a negative label ({y.min()})")
    if names is not None and y.max() >= len(names):
        raise DataLoadError(f"{path}: label {y.max()} in {key} has no name among the {len(names)} classes given")
    return torch.from_numpy(y.astype(np.int64))


def _names(y: np.ndarray, names: Optional[list[str]]) -> list[str]:
    return names if names is not None else [str(k) for k in range(int(y.max()) + 1)]


# ----------------------------------------------------------------------------------------------------------------
# model and data together

def check_fit(model: nn.Module, meta: dict[str, Any], data: ImageData, *,
              device: str | torch.device = "cpu") -> int:
    """Check that ``data`` fits ``model`` (metadata ``meta`` from :func:`robustcnn.loading.load_model`); return
    the number of classes. One line names everything that does not fit: the image shape, the number of classes,
    labels out of range, or outputs that are not logits (see :func:`robustcnn.loading.probe`)."""
    from robustcnn.loading import ModelLoadError, probe

    want = meta.get("input_shape")
    if want is not None and tuple(want) != data.shape:
        c, h, w = want
        hints = (["grayscale (--grayscale)"] if c == 1 and data.shape[0] == 3 else []) + (
            [f"image_size={h} (--image-size {h})"] if (h, w) != data.shape[1:] and h == w else [])
        raise ModelLoadError(f"the model takes {c}x{h}x{w} images, the data has {'x'.join(map(str, data.shape))}"
                             + (f": try {' and '.join(hints)}" if hints else ""))
    k = probe(model, to_float(data.images[:2]), device=device)
    problems = []
    if len(data.classes) != k:
        problems.append(f"the model has {k} outputs, the data {len(data.classes)} classes")
    known = meta.get("classes")
    if known is not None and meta.get("dataset") == data.name and list(known) != list(data.classes):
        problems.append(f"the model's {data.name} classes differ from the ones found here")
    top = int(data.labels.max()) if len(data) else -1
    if top >= k:
        problems.append(f"label {top} is out of range for {k} outputs")
    if problems:
        raise ModelLoadError("the data does not fit the model: " + "; ".join(problems))
    return k
