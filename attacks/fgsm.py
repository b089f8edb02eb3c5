"""FGSM — Fast Gradient Sign Method.

Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
One step of size ``eps`` along the sign of the loss gradient: ``x + eps * sign(dL/dx)`` (Linf). Under L2 the step
follows the normalized gradient instead (the "fast gradient method").

>>> atk = FGSM(eps=0.1)
>>> res = atk(model, x, y)          # res.x_adv, res.success, res.queries, res.norms
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import BoundedAttack, check_choice
from attacks.iterative import gradient_ascent
from attacks.losses import LOSSES, get_loss
from attacks.params import param
from attacks.registry import register


@register
@dataclass(frozen=True, kw_only=True)
class FGSM(BoundedAttack):
    """Single-step attack."""

    name = "fgsm"
    accepts_start = True
    supported_norms = ("linf", "l2")
    description = "Fast Gradient Sign Method: one gradient-sign step of size eps (Goodfellow et al. 2015)"

    loss: str = param("ce", "Loss to maximize: ce (the paper's), dlr or margin.")
    early_stop: bool = param(True, "Leave samples already misclassified unchanged (False: step every sample, as "
                                   "adversarial training wants).")

    def _validate(self) -> None:
        super()._validate()
        check_choice("loss", self.loss, LOSSES)

    def _run(self, ctx):
        return gradient_ascent(ctx, norm=self.norm_obj, eps=self.eps, alpha=self.eps, steps=1,
                               objective=get_loss(self.loss), early_stop=self.early_stop)
