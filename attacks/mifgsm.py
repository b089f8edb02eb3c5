"""MI-FGSM — Momentum Iterative FGSM.

Dong, Liao, Pang, Su, Zhu, Hu & Li, "Boosting Adversarial Attacks with Momentum", CVPR 2018.
Accumulates a velocity ``g <- decay * g + grad / ||grad||_1`` and steps along its sign; paper defaults:
``decay = 1.0``, 10 steps of ``alpha = eps / steps``, no random start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from attacks.base import check_range
from attacks.iterative import gradient_ascent
from attacks.losses import get_loss
from attacks.params import param
from attacks.pgd import IterativeAttack
from attacks.registry import register


@register
@dataclass(frozen=True, kw_only=True)
class MIFGSM(IterativeAttack):
    name = "mifgsm"
    supported_norms = ("linf", "l2")
    description = "Momentum Iterative FGSM: gradient steps with accumulated momentum (Dong et al. 2018)"

    alpha: Optional[float] = param(None, "Step size in [0, 1] pixel units, in the attack's norm "
                                   "(None: eps / steps).")
    decay: float = param(1.0, "Decay of the accumulated gradient: g <- decay * g + grad / ||grad||_1 (0: none).")

    def _validate(self) -> None:
        super()._validate()
        check_range("decay", self.decay, low=0.0, low_inclusive=True)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else self.eps / self.steps

    def _run(self, ctx):
        return gradient_ascent(ctx, norm=self.norm_obj, eps=self.eps, alpha=self.step_size, steps=self.steps,
                               objective=get_loss(self.loss), momentum=self.decay, early_stop=self.early_stop)
