"""BIM / I-FGSM — the Basic Iterative Method.

Kurakin, Goodfellow & Bengio, "Adversarial examples in the physical world", ICLR workshop 2017.
FGSM repeated with a small step, clipping to the eps-ball after each step, starting at ``x`` (no random start).
Paper defaults (Linf): ``alpha = 1/255`` and ``steps = min(255*eps + 4, 1.25 * 255*eps)``. Under L2 the defaults
are 10 steps of ``1.25 * eps / steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from attacks.base import check_norm
from attacks.iterative import gradient_ascent
from attacks.losses import get_loss
from attacks.norms import L2, Linf
from attacks.params import param
from attacks.pgd import IterativeAttack
from attacks.registry import register

#: Default steps (from ``eps > 0``) and step size (from ``eps`` and the steps) per norm: the paper's rules under
#: Linf, ``1.25 * eps`` spread over 10 steps under L2.
DEFAULTS = {
    Linf: (lambda eps: min(255 * eps + 4, 1.25 * 255 * eps), lambda eps, steps: 1 / 255),
    L2: (lambda eps: 10, lambda eps, steps: 1.25 * eps / steps),
}


@register
@dataclass(frozen=True, kw_only=True)
class BIM(IterativeAttack):
    name = "bim"
    supported_norms = ("linf", "l2")
    description = "Basic Iterative Method / I-FGSM: repeated small FGSM steps from x (Kurakin et al. 2017)"

    steps: Optional[int] = param(  # type: ignore[assignment]
        None, "Gradient steps (None: the paper's min(255 eps + 4, 1.25 * 255 eps) under Linf, 10 under L2).", fast=10)
    alpha: Optional[float] = param(None, "Step size in [0, 1] pixel units, in the attack's norm (None: 1/255 under "
                                   "Linf, 1.25 * eps / steps under L2).", fast=0.04)

    def _validate(self) -> None:
        check_norm(self, self.norm)
        if self.steps is None:
            steps_rule = DEFAULTS[type(self.norm_obj)][0]
            object.__setattr__(self, "steps", max(1, math.ceil(steps_rule(self.eps))) if self.eps else 10)
        super()._validate()

    @property
    def step_size(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return DEFAULTS[type(self.norm_obj)][1](self.eps, self.steps)

    def _run(self, ctx):
        return gradient_ascent(ctx, norm=self.norm_obj, eps=self.eps, alpha=self.step_size, steps=self.steps,
                               objective=get_loss(self.loss), early_stop=self.early_stop)
