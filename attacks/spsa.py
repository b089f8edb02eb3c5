"""SPSA — Adam ascent on a gradient estimated by Simultaneous Perturbation Stochastic Approximation.

Uesato, O'Donoghue, van den Oord & Kohli, "Adversarial Risk and the Dangers of Evaluating Against Weak Attacks",
ICML 2018 (after Spall 1992). Each iteration estimates the gradient of the margin loss from ``samples`` queries at
``x +- delta v`` with Rademacher (+-1) ``v`` (antithetic pairs), feeds it to Adam (per sample) with learning rate
``alpha``, and projects onto the ``eps``-ball and the [0, 1] box; one more query checks the new iterate. Cost:
``samples + 1`` queries per sample per iteration.

Defaults are the reference implementation's — ``delta`` (field ``sigma``) 0.01, 128 samples per estimate, margin
loss — except Adam's learning rate: its fixed 0.01 assumes many thousands of queries, so here it follows PGD's
rule ``2.5 eps / iterations`` for the iterations ``max_queries`` pays for (7 at 1000 queries). SPSA was made to
check defenses with large budgets; it is the least query-efficient attack of the family.

>>> SPSA(eps=0.1, max_queries=5000)(model, x, y)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attacks.blackbox import EstimatedGradientAttack, ScoreSearch
from attacks.optim import Adam
from attacks.params import param
from attacks.registry import register
from attacks.rng import SampleRNG
from attacks.square import rademacher
from attacks.workset import WorkSet


@register
@dataclass(frozen=True, kw_only=True)
class SPSA(EstimatedGradientAttack):
    name = "spsa"
    description = "SPSA gradient estimation + Adam, projected, scores only (Uesato et al. 2018)"

    samples: int = param(128, "Queries per gradient estimate (even: antithetic pairs).", fast=10)
    sigma: float = param(0.01, "Distance of the probes x +- sigma * u (the paper's delta), in [0, 1] pixel units.")

    def _noise(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
        return rademacher(rng, idx, shape)

    def _start(self, search: ScoreSearch, ids: Tensor) -> WorkSet:
        work = super()._start(search, ids)
        work.moments = Adam.moments(work.x)
        return work

    def _update(self, search: ScoreSearch, work: WorkSet, grad: Tensor) -> Tensor:
        # each sample's own Adam step count: its iterations so far, plus this one
        move, work.moments = Adam(self.step_size).step(work.moments, grad, work.it + 1)
        return work.x + move
