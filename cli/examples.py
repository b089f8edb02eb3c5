"""The ``--save-examples`` picture: originals, adversarial images and amplified perturbations, labelled."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from robustcnn.errors import UsageError


def save_grid(path: Path, images, labels, report, model, classes, device, columns: int = 8) -> None:
    """Write a 3-row grid (original / adversarial / perturbation x amplification) for fooled samples, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--save-examples must name a .png file, got {path}")
    if path.is_dir():
        raise UsageError(f"--save-examples {path} is a folder; name a .png file")
    fooled = (~report.robust & report.clean_correct).nonzero().squeeze(1)[:columns]
    x = images[fooled].float() / 255 if images.dtype == torch.uint8 else images[fooled]
    xa = report.x_adv[fooled]
    with torch.no_grad():
        pred = model(xa.to(device)).argmax(1).cpu() if len(fooled) else torch.empty(0, dtype=torch.long)
    delta = xa - x
    scale = float(delta.abs().max()) if len(fooled) else 0.0
    k = max(1, len(fooled))
    fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5.2), squeeze=False)
    for col in range(k):
        for row in range(3):
            axes[row][col].axis("off")
        if col >= len(fooled):
            continue
        shows = (x[col], xa[col], (delta[col] / (2 * scale) + 0.5) if scale else delta[col] + 0.5)
        for row, img in enumerate(shows):
            arr = img.permute(1, 2, 0).clamp(0, 1).numpy()
            axes[row][col].imshow(arr.squeeze(-1) if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
        axes[0][col].set_title(f"true: {classes[int(labels[fooled[col]])]}", fontsize=7)
        axes[1][col].set_title(f"pred: {classes[int(pred[col])]}", fontsize=7, color="red")
        axes[2][col].set_title(f"x{0.5 / scale:.0f}" if scale else "no change", fontsize=7)
    if not len(fooled):
        axes[0][0].set_title("no image was fooled", fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
