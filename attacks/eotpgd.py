"""EOT-PGD — PGD on the Expectation Over Transformation of a randomized model.

Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018 (and Athalye et al.,
"Synthesizing Robust Adversarial Examples", ICML 2018). When the model is random (dropout at test time, random
input transforms), each step averages the gradient over ``eot_samples`` forward/backward passes, so the attack
follows the expected loss instead of one noisy draw. On a deterministic model it equals PGD at
``eot_samples`` times the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import check_int
from attacks.iterative import gradient_ascent
from attacks.losses import get_loss
from attacks.params import param
from attacks.pgd import PGD
from attacks.registry import register


@register
@dataclass(frozen=True, kw_only=True)
class EOTPGD(PGD):
    name = "eotpgd"
    supported_norms = ("linf", "l2")
    description = "PGD with gradients averaged over the model's randomness (EOT; Athalye et al. 2018)"

    eot_samples: int = param(10, "Forward/backward passes averaged per gradient step (the expectation over the "
                                 "model's randomness).", fast=2)

    def _validate(self) -> None:
        super()._validate()
        check_int("eot_samples", self.eot_samples)

    def _run(self, ctx):
        return gradient_ascent(
            ctx, norm=self.norm_obj, eps=self.eps, alpha=self.step_size, steps=self.steps,
            objective=get_loss(self.loss), random_start=self.random_start, restarts=self.restarts,
            eot_samples=self.eot_samples, early_stop=self.early_stop,
        )
