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

import torch
from torch import Tensor

from attacks.blackbox import EstimatedGradientAttack, ScoreSearch, State
from attacks.norms import per_sample
from attacks.registry import register
from attacks.rng import SampleRNG
from attacks.square import rademacher

_BETAS = (0.9, 0.999)  # Adam's defaults
_ADAM_EPS = 1e-8


@register
@dataclass(frozen=True, kw_only=True)
class SPSA(EstimatedGradientAttack):
    """``samples`` (even), ``sigma`` (the paper's delta): the estimator; ``alpha``: Adam's learning rate (None:
    ``2.5 eps / iterations``)."""

    name = "spsa"
    description = "SPSA gradient estimation + Adam, projected, scores only (Uesato et al. 2018)"

    samples: int = 128
    sigma: float = 0.01

    def _noise(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
        return rademacher(rng, idx, shape)

    def _start(self, search: ScoreSearch, ids: Tensor) -> State:
        state = super()._start(search, ids)
        state["m"], state["v"] = torch.zeros_like(state["x"]), torch.zeros_like(state["x"])
        return state

    def _update(self, search: ScoreSearch, state: State, grad: Tensor) -> tuple[Tensor, State]:
        b1, b2 = _BETAS
        state["m"] = b1 * state["m"] + (1 - b1) * grad
        state["v"] = b2 * state["v"] + (1 - b2) * grad * grad
        t = state["it"].double() + 1  # each sample's own Adam step (bias corrections in double, as for a float)
        m_hat = state["m"] / per_sample(1 - b1 ** t, grad)
        v_hat = state["v"] / per_sample(1 - b2 ** t, grad)
        return state["x"] + self.step_size * m_hat / (v_hat.sqrt() + _ADAM_EPS), state
