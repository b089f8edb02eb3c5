"""KL-PGD — the inner maximization of TRADES: move the prediction as far as possible from the clean one.

Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019. PGD on ``KL(p(x) || p(x'))`` instead of the cross-entropy of the label: the reference ``p(x)`` is the
model's prediction on the clean input (one forward pass, charged as a query). The objective is zero and flat at
``x' = x``, so the run starts from a random point of the ball. Used by adversarial training (``--adv trades``);
``success`` is still "the label changed", as for every untargeted attack. Not registered: as an evaluation attack it
is weaker than PGD on the cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.base import BoundedAttack, check_int, check_range
from attacks.iterative import gradient_ascent
from attacks.losses import kl_from_reference
from attacks.params import param


@dataclass(frozen=True, kw_only=True)
class KLPGD(BoundedAttack):
    """``steps`` ascent steps of size ``alpha`` on the KL from the clean prediction."""

    name = "pgd-kl"
    accepts_start = True
    supported_norms = ("linf", "l2")
    targeted_ok = False
    description = "PGD on the KL from the clean prediction: the TRADES inner maximization (Zhang et al. 2019)"

    steps: int = param(10, "Ascent steps.")
    alpha: float | None = param(None, "Step size in [0, 1] pixel units, in the attack's norm "
                                "(None: 2.5 * eps / steps).")
    early_stop: bool = param(False, "Stop stepping a sample once it is misclassified (False, as training wants: "
                                    "step every sample every time and return the last iterate).")

    def _validate(self) -> None:
        super()._validate()
        check_int("steps", self.steps)
        if self.alpha is not None:
            check_range("alpha", self.alpha, low=0.0)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def _run(self, ctx):
        everyone = torch.arange(ctx.n, device=ctx.x.device)
        reference = F.log_softmax(ctx.logits(ctx.x, everyone).float(), dim=1)
        return gradient_ascent(
            ctx.retarget(reference), norm=self.norm_obj, eps=self.eps, alpha=self.step_size, steps=self.steps,
            objective=kl_from_reference, random_start=True, early_stop=self.early_stop,
        )
