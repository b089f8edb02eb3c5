"""Per-sample objectives that gradient attacks *maximize*; shape ``(N,)``.

Each takes ``(logits, y, target)``; ``target`` is ``None`` for an untargeted attack. For a targeted attack the
objective rises as the target class wins, so the same ascent loop serves both modes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor

Objective = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def _other_max(logits: Tensor, cls: Tensor) -> Tensor:
    """Largest logit among the classes other than ``cls``."""
    masked = logits.scatter(1, cls[:, None], float("-inf"))
    return masked.amax(dim=1)


def cross_entropy(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    """CE of the true class (untargeted), or minus CE of the target class (targeted)."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def margin(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    """Carlini-Wagner margin: best wrong logit minus true logit (or target logit minus best other logit)."""
    if target is None:
        return _other_max(logits, y) - logits.gather(1, y[:, None])[:, 0]
    return logits.gather(1, target[:, None])[:, 0] - _other_max(logits, target)


def dlr(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): a margin divided by a logit spread, so it is scale invariant.

    Untargeted: ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)``.
    Targeted:   ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``.
    """
    ranked = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    if target is None:
        if logits.shape[1] < 3:
            raise ValueError("the DLR loss needs at least 3 classes")
        return -(z_y - _other_max(logits, y)) / (ranked[:, 0] - ranked[:, 2] + 1e-12)
    if logits.shape[1] < 4:
        raise ValueError("the targeted DLR loss needs at least 4 classes")
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (ranked[:, 0] - (ranked[:, 2] + ranked[:, 3]) / 2 + 1e-12)


LOSSES: dict[str, Objective] = {"ce": cross_entropy, "dlr": dlr, "margin": margin}


def kl_from_reference(logits: Tensor, y: Tensor, reference: Optional[Tensor]) -> Tensor:
    """``KL(reference || softmax(logits))`` per sample: how far the prediction moved from a reference distribution.

    ``reference`` holds per-sample *log*-probabilities ``(N, K)``, passed where targeted objectives get their target
    (an attack sets it with :meth:`attacks.base.Context.retarget`); ``y`` is unused. This is the inner objective of
    TRADES (Zhang et al. 2019), whose reference is the model's own prediction on the clean input. It is not in
    :data:`LOSSES` because it needs that reference, which only an attack built for it (:class:`attacks.KLPGD`)
    provides.
    """
    if reference is None or reference.dim() != 2 or reference.shape != logits.shape:
        raise ValueError("the KL objective needs reference log-probabilities of the logits' shape (N, K)")
    log_p = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_p, reference.float(), reduction="none", log_target=True).sum(dim=1)


def get_loss(name: str) -> Objective:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
