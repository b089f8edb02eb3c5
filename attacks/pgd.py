"""PGD — Projected Gradient Descent with a random start and random restarts.

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018. Start at a uniform random point of the eps-ball, take ``steps`` steepest-ascent steps of size ``alpha``
on the loss, projecting back onto the ball and the [0, 1] box after each one; restart from new random points for
the samples not yet fooled. Default step size ``alpha = 2.5 * eps / steps`` (the paper's rule, so a run can cross the
ball). Linf and L2.

>>> PGD(eps=8/255, steps=10)(model, x, y).success.float().mean()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from attacks.base import MAX_RESTARTS, BoundedAttack, check_choice, check_int, check_range
from attacks.iterative import gradient_ascent
from attacks.losses import LOSSES, get_loss
from attacks.params import param
from attacks.registry import register


@dataclass(frozen=True, kw_only=True)
class IterativeAttack(BoundedAttack):
    """Shared settings of the multi-step members of the family (``alpha=None`` means the attack's default rule)."""

    accepts_start = True

    steps: int = param(10, "Gradient steps per run.")
    alpha: Optional[float] = param(None, "Step size in [0, 1] pixel units, in the attack's norm "
                                   "(None: 2.5 * eps / steps).")
    loss: str = param("ce", "Loss to maximize: ce, dlr or margin.")
    early_stop: bool = param(True, "Stop stepping a sample once it is fooled (False: step every sample every "
                                   "time, as adversarial training wants).")

    def _validate(self) -> None:
        super()._validate()
        check_int("steps", self.steps)
        if self.alpha is not None:
            check_range("alpha", self.alpha, low=0.0)
        check_choice("loss", self.loss, LOSSES)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps


@register
@dataclass(frozen=True, kw_only=True)
class PGD(IterativeAttack):
    name = "pgd"
    supported_norms = ("linf", "l2")
    description = "Projected Gradient Descent with random start and restarts (Madry et al. 2018)"

    restarts: int = param(1, "Runs from random starts; each later one only for the samples still unfooled.")
    random_start: bool = param(True, "Start at a uniform random point of the ball (False: at x).")

    def _validate(self) -> None:
        super()._validate()
        check_int("restarts", self.restarts, high=MAX_RESTARTS)

    def _run(self, ctx):
        return gradient_ascent(
            ctx, norm=self.norm_obj, eps=self.eps, alpha=self.step_size, steps=self.steps,
            objective=get_loss(self.loss), random_start=self.random_start, restarts=self.restarts,
            early_stop=self.early_stop,
        )
