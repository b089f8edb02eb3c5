"""NES — projected gradient ascent on a gradient estimated with Natural Evolution Strategies.

Ilyas, Engstrom, Athalye & Lin, "Black-box Adversarial Attacks with Limited Queries and Information", ICML 2018.
Each iteration estimates the gradient of the loss from ``samples`` queries at ``x +- sigma u`` with Gaussian ``u``
(antithetic pairs), takes a steepest-ascent step of size ``alpha`` (the sign of the estimate under Linf, its
normalized direction under L2) and projects onto the ``eps``-ball and the [0, 1] box; one more query checks the new
iterate. Cost: ``samples + 1`` queries per sample per iteration.

Defaults are the paper's — 50 samples per estimate, ``sigma = 0.001``, cross-entropy loss — except the step:
the paper's 0.01 (at eps 0.05, with up to 10,000 queries) becomes PGD's rule ``2.5 eps / iterations``, the
iterations being what ``max_queries`` pays for (19 at 1000 queries).

>>> NES(eps=0.1, max_queries=1000)(model, x, y)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attacks.blackbox import EstimatedGradientAttack, ScoreSearch
from attacks.params import param
from attacks.registry import register
from attacks.rng import SampleRNG
from attacks.workset import WorkSet


@register
@dataclass(frozen=True, kw_only=True)
class NES(EstimatedGradientAttack):
    name = "nes"
    description = "NES gradient estimation + projected sign steps, scores only (Ilyas et al. 2018)"

    loss: str = param("ce", "Objective maximized: ce (the paper's), margin or dlr.")

    def _noise(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
        return rng.normal(idx, shape)

    def _update(self, search: ScoreSearch, work: WorkSet, grad: Tensor) -> Tensor:
        return work.x + self.step_size * search.norm.steepest(grad)
