"""Pictures for users: adversarial-example grids and accuracy-vs-eps curves, written atomically as PNG.

Every PNG carries robustcnn's "Software" tag, so a later run may replace it but never a picture of the user's.

matplotlib (Agg backend, no display needed) is imported lazily, only when a picture is requested.
"""

from __future__ import annotations

from pathlib import Path

import torch

from robustcnn.errors import UsageError
from robustcnn.fsutil import PNG_SOFTWARE, atomic_write, refuse_foreign


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_png_path(path: Path, option: str) -> Path:
    """Refuse a path that cannot take a PNG, or that holds a file robustcnn did not write (usage errors), before
    any work is done."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"{option} must name a .png file, got {path}")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; name a .png file")
    refuse_foreign(path, option=option)
    return path


def _save(fig, path: Path) -> None:
    """Save a figure as PNG, atomically."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, metadata={"Software": PNG_SOFTWARE}))
    finally:
        _pyplot().close(fig)


def save_grid(path: Path, x: torch.Tensor, x_adv: torch.Tensor, labels, model, classes, device,
              columns: int = 8) -> None:
    """A 3-row grid — original, adversarial (with the predicted class), perturbation amplified to full range —
    for the first ``columns`` pairs ``x``/``x_adv`` (floats in [0, 1], on the CPU)."""
    plt = _pyplot()
    x, x_adv, labels = x[:columns], x_adv[:columns], labels[:columns]
    with torch.no_grad():
        pred = model(x_adv.to(device)).argmax(1).cpu() if len(x) else torch.empty(0, dtype=torch.long)
    delta = x_adv - x
    scale = float(delta.abs().max()) if len(x) else 0.0
    k = max(1, len(x))
    fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5.2), squeeze=False)
    for col in range(k):
        for row in range(3):
            axes[row][col].axis("off")
        if col >= len(x):
            continue
        shows = (x[col], x_adv[col], (delta[col] / (2 * scale) + 0.5) if scale else delta[col] + 0.5)
        for row, img in enumerate(shows):
            arr = img.permute(1, 2, 0).clamp(0, 1).numpy()
            axes[row][col].imshow(arr.squeeze(-1) if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
        axes[0][col].set_title(f"true: {classes[int(labels[col])]}", fontsize=7)
        axes[1][col].set_title(f"pred: {classes[int(pred[col])]}", fontsize=7, color="red")
        axes[2][col].set_title(f"x{0.5 / scale:.0f}" if scale else "no change", fontsize=7)
    if not len(x):
        axes[0][0].set_title("no image was fooled", fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path))


def save_curves(path: Path, eps: list[float], curves: dict[str, list[float]], title: str, xlabel: str) -> None:
    """Accuracy-vs-eps lines, one per entry of ``curves`` (values in [0, 1])."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        bold = label.startswith("worst case")
        ax.plot(eps, [100 * v for v in values], marker="o", linewidth=2.5 if bold else 1.2,
                color="black" if bold else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path))
