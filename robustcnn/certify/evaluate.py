"""Certified accuracy of a model on a test set: per image, what each method proves, and the curves built from it.

* :func:`smooth_certify` — randomized smoothing: per image the smoothed prediction (or abstention) and the certified
  L2 radius; :func:`certified_accuracy` then gives the fraction correct *and* certified at each radius.
* :func:`ibp_certify` — interval bound propagation: per image and Linf eps, whether the prediction is verified, and
  (with ``attack``) whether an attack fooled it. A sample both verified and fooled is a *soundness error*: it is
  listed, never counted as robust (an attack that finds an input the bounds rule out means a bug somewhere).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from robustcnn.certify.ibp import verified
from robustcnn.certify.smoothing import ABSTAIN, Smoothed
from robustcnn.data import to_float


def _device(model: nn.Module, images: torch.Tensor) -> torch.device:
    """Where ``model`` runs: its parameters' device (the images' for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else images.device


def image_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise stream of test image ``index`` under ``seed``: an image's result does not depend on which others
    are certified with it."""
    digest = hashlib.sha256(f"robustcnn-smoothing:{seed}:{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def smooth_certify(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, sigma: float, num_classes: int,
                   n0: int, samples: int, alpha: float, batch_size: int = 1000, seed: int = 0,
                   on_image: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """CERTIFY every image (uint8 or float in [0, 1]; on ``model``'s device): one dict per image with ``index``,
    ``label``, ``prediction`` (None when abstaining), ``correct``, ``radius`` (L2, 0 when abstaining) and
    ``p_lower``. ``on_image(done)`` after each image."""
    smoothed = Smoothed(model, sigma, num_classes)
    device = _device(model, images)
    rows = []
    for i in range(images.shape[0]):
        x = images[i] if images.is_floating_point() else to_float(images[i])
        cert = smoothed.certify(x.to(device), n0, samples, alpha, batch_size, image_generator(seed, i, device))
        label = int(labels[i])
        predicted = None if cert.prediction == ABSTAIN else cert.prediction
        rows.append({"index": i, "label": label, "prediction": predicted, "correct": predicted == label,
                     "radius": cert.radius, "p_lower": cert.p_lower})
        if on_image is not None:
            on_image(i + 1)
    return rows


def certified_accuracy(rows: Sequence[dict[str, Any]], radii: Sequence[float]) -> list[float]:
    """Per radius ``r``: the fraction of ``rows`` predicted correctly with a certified radius of at least ``r``."""
    if not rows:
        return [float("nan")] * len(radii)
    return [sum(1 for row in rows if row["correct"] and row["radius"] >= r) / len(rows) for r in radii]


@dataclass
class IBPResult:
    """Per eps: the verified and (when attacked) the fooled samples, bool (n,); ``correct``: clean predictions."""

    eps: list[float]
    correct: torch.Tensor
    verified: list[torch.Tensor]
    fooled: list[torch.Tensor | None] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        """One row per eps: clean, verified and attacked accuracy, and the soundness errors: indices of samples
        verified yet misclassified or fooled (not counted as verified)."""
        n = max(1, self.correct.numel())
        out = []
        for eps, proven, fooled in zip(self.eps, self.verified, self.fooled):
            wrong = ~self.correct if fooled is None else ~self.correct | fooled
            row = {"eps": eps, "clean_accuracy": float(self.correct.sum()) / n,
                   "verified_accuracy": float((proven & ~wrong).sum()) / n,
                   "attacked_accuracy": None if fooled is None else float((self.correct & ~fooled).sum()) / n,
                   "soundness_errors": (proven & wrong).nonzero().flatten().tolist()}
            out.append(row)
        return out

    def per_sample(self, labels: torch.Tensor) -> list[dict[str, Any]]:
        """One dict per image: label, correct, and per eps verified / fooled."""
        rows = []
        for i in range(self.correct.numel()):
            rows.append({"index": i, "label": int(labels[i]), "correct": bool(self.correct[i]),
                         "verified": {f"{e:g}": bool(v[i]) for e, v in zip(self.eps, self.verified)},
                         "fooled": {f"{e:g}": (None if f is None else bool(f[i])) for e, f in
                                    zip(self.eps, self.fooled)}})
        return rows


def ibp_certify(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: Sequence[float], *,
                batch_size: int = 250, attack: Callable[[float], Any] | None = None, seed: int = 0) -> IBPResult:
    """IBP verification of ``model`` on ``images`` (uint8 or float in [0, 1]) at every Linf ``eps``; with
    ``attack`` (eps -> an attack from :mod:`attacks`), also which samples it fools (via :func:`attacks.evaluate`,
    seeded per sample by ``seed``)."""
    import attacks

    device = _device(model, images)
    x = images.to(device) if images.is_floating_point() else to_float(images, device)
    y = labels.to(device)
    with torch.inference_mode():
        flags = [m.training for m in model.modules()]
        model.eval()
        try:
            correct = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(y), batch_size)]) == y
        finally:
            for m, f in zip(model.modules(), flags):
                m.training = f
    result = IBPResult(list(eps), correct.cpu(), [], [])
    for e in eps:
        result.verified.append(verified(model, x, y, e, batch_size).cpu())
        if attack is None:
            result.fooled.append(None)
            continue
        report = attacks.evaluate(model, (x, y), [attack(e)], batch_size=batch_size, device=device, seed=seed)
        result.fooled.append((report.clean_correct & ~report.robust).cpu())
    return result
