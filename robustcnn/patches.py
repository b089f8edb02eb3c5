"""Universal-patch files and measurements.

A patch is saved as a PNG (for eyes and image tools; 8 bits per channel) and a tensor file ``.pt`` (the exact
float patch); :func:`load_patch` reads either. :func:`measure_patch` says how a patch does on held-out images.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

import attacks
from attacks.evaluate import correctly_classified, run_stage
from attacks.patch import check_patch
from robustcnn.errors import RobustCNNError, UsageError
from robustcnn.fsutil import atomic_write, png_tag

#: File suffixes read as tensor files; any other is read as an image.
TENSOR_SUFFIXES = (".pt", ".pth")


def load_patch(path: str | Path, image_shape: Optional[tuple[int, int, int]] = None) -> Tensor:
    """Read a patch saved as a tensor file (``.pt``/``.pth``) or an image (PNG, JPEG); returns ``(C, h, w)`` floats.

    With ``image_shape = (C, H, W)`` the patch must also fit the model's images (same channels, smaller than the
    image). A file that cannot be read raises :class:`RobustCNNError` (exit 1); one that is not a patch (not an image,
    wrong shape or values) raises :class:`UsageError` (exit 2).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RobustCNNError(f"cannot read patch file {path}: {exc.strerror or exc}") from None
    patch = _tensor_from_bytes(raw, path) if path.suffix.lower() in TENSOR_SUFFIXES else _image_from_bytes(raw, path)
    try:
        return check_patch(patch, image_shape)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _tensor_from_bytes(raw: bytes, path: Path) -> Tensor:
    try:
        patch = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception:  # torch.load fails in many ways on foreign bytes; all mean "not a tensor file"
        raise UsageError(f"{path} is not a tensor file (save a patch with `robustcnn patch train`)") from None
    if not isinstance(patch, torch.Tensor):
        raise UsageError(f"{path} holds a {type(patch).__name__}, not a patch tensor of shape (C, h, w)")
    return patch.float()


def _image_from_bytes(raw: bytes, path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            mode, pixels = img.mode, np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError):
        raise UsageError(f"{path} is not an image or tensor file (use a PNG, or the .pt a patch run wrote)") from None
    if mode not in ("L", "RGB"):
        raise UsageError(f"{path}: a patch image must be 8-bit grayscale or RGB without alpha, got mode {mode}")
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(chw.copy()).float() / 255


def save_patch(patch: Tensor, stem: Path) -> tuple[Path, Path]:
    """Write ``patch`` as ``<stem>.png`` and ``<stem>.pt``, each atomically; returns both paths."""
    from PIL import Image

    patch = check_patch(patch.detach().cpu().float())
    pixels = (patch * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buf = io.BytesIO()
    torch.save(patch.clone(), buf)
    png_path = atomic_write(stem.parent / f"{stem.name}.png",
                            lambda handle: img.save(handle, format="PNG", pnginfo=png_tag()))
    pt_path = atomic_write(stem.parent / f"{stem.name}.pt", lambda handle: handle.write(buf.getvalue()))
    return png_path, pt_path


def measure_patch(model: nn.Module, images: Tensor, labels: Tensor, patch: Tensor, *, target: Optional[int],
                  seed: int, batch_size: Optional[int], device: torch.device, noise: bool = False,
                  draws: int = 1) -> dict[str, Any]:
    """How ``patch`` at random places does on the test images; with ``noise`` the same for the control, a
    uniform-noise patch of the same size drawn afresh for every image.

    ``patched_accuracy`` is the model's accuracy on every test image with the patch pasted on it (what "accuracy
    under the patch" means for a patch applied to every image); ``robust_accuracy`` counts an image only if it was
    classified correctly both without and with the patch (the attack convention, which never credits a patch for
    an image it happened to put right); ``success_rate`` is the share of the correctly classified images fooled
    (targeted: sent to the target). Every image gets the same place in both measures.

    With ``draws`` > 1 every image is patched at ``draws`` places (draw ``d`` uses the per-sample keys of seed
    ``seed + d``, so draw 0 is the single-draw measure); the three figures are means over the draws, each draw's
    are listed under ``"draws"``, and ``drop_sd`` is the standard deviation over the draws of the accuracy drop
    (clean minus patched accuracy): how much of a figure is the luck of where the patches landed.
    """
    atk = attacks.UniversalPatch(patch=patch, noise=noise)
    n, bs = images.shape[0], batch_size or 256
    model.eval()
    clean = correctly_classified(model, images, labels, batch_size=bs, device=device)
    per_draw = []
    for d in range(draws):
        run = dict(batch_size=bs, device=device, seed=seed + d)  # evaluate's per-sample keys: same places
        wrong = run_stage(model, images, labels, torch.arange(n), atk, "patch", **run).fooled  # every image, patched
        if target is None:
            hit = wrong[clean]
        else:
            tgt = torch.full_like(labels, target)
            hit = run_stage(model, images, labels, clean.nonzero()[:, 0], atk, "patch", target=tgt, **run).fooled
        per_draw.append({"patched_accuracy": (n - int(wrong.sum())) / n,
                         "robust_accuracy": (int(clean.sum()) - int(hit.sum())) / n,
                         "success_rate": hit.float().mean().item()})
    mean = {k: sum(r[k] for r in per_draw) / draws for k in per_draw[0]}
    patched = torch.tensor([r["patched_accuracy"] for r in per_draw], dtype=torch.float64)
    return {"clean_accuracy": int(clean.sum()) / n, **mean,
            "drop_sd": patched.std().item() if draws > 1 else 0.0, "draws": per_draw,
            "area": patch.shape[1] * patch.shape[2] / images[0, 0].numel()}
