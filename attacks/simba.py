"""SimBA — Simple Black-box Attack.

Guo, Gardner, You, Wilson & Weinberger, "Simple Black-box Adversarial Attacks", ICML 2019. Walk through an
orthonormal basis in random order; for each direction ``q`` try ``x - step q`` and, if that does not lower the
true-class probability, ``x + step q``; keep whichever lowers it (one or two queries per sample per iteration).

* ``basis="pixel"``: single pixels (one channel of one location), in random order (SimBA).
* ``basis="dct"``: 2-D DCT basis images, low frequencies first (rings ``max(u, v)`` in increasing order, random
  inside a ring), which finds adversarial examples in far fewer queries on natural images (SimBA-DCT).

The paper's attack is unbounded with step 0.2 (L2 units); here each step is ``step`` long in the attack's norm
(None: ``eps`` under Linf — a full step to the edge of the ball —, ``min(0.2, eps)`` under L2) and every iterate
is projected onto the ``eps``-ball and the [0, 1] box. The objective is the paper's probability of the true class
(``loss="prob"``: lowered untargeted, target probability raised when targeted); the margin, CE and DLR losses
are accepted too.

>>> SimBA(eps=0.1, basis="dct", max_queries=1000)(model, x, y)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from attacks.base import check_choice, check_range
from attacks.blackbox import ScoreAttack, ScoreSearch
from attacks.losses import LOSSES, Objective
from attacks.norms import L2, Linf, per_sample
from attacks.params import param
from attacks.registry import register
from attacks.workset import WorkSet

BASES = ("pixel", "dct")

#: The default step for each norm, from ``eps``: a full step to the edge of the ball (Linf), the paper's 0.2 (L2)
#: unless the ball is smaller.
DEFAULT_STEP = {Linf: lambda eps: eps, L2: lambda eps: min(0.2, eps)}


def probability(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    """The paper's objective, to maximize: minus the true-class probability, or the target-class probability."""
    p = logits.softmax(dim=1)
    if target is None:
        return -p.gather(1, y[:, None])[:, 0]
    return p.gather(1, target[:, None])[:, 0]


@lru_cache(maxsize=8)
def dct_matrix(size: int) -> Tensor:
    """The orthonormal DCT-II matrix (CPU, cached): row ``k`` is the ``k``-th cosine basis vector of length ``size``."""
    i = torch.arange(size, dtype=torch.float64)
    k = i[:, None]
    m = torch.cos(math.pi * (2 * i[None, :] + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    m[0] /= math.sqrt(2.0)
    return m.to(torch.float32)


@register
@dataclass(frozen=True, kw_only=True)
class SimBA(ScoreAttack):
    name = "simba"
    description = "SimBA: +-step along random pixel or low-frequency DCT directions, scores only (Guo et al. 2019)"

    basis: str = param("dct", "Search directions: pixel (single pixels) or dct (low-frequency cosine images first).")
    step: Optional[float] = param(None, "Length of one step in the attack's norm, in [0, 1] pixel units (None: eps "
                                  "under Linf, min(0.2, eps) under L2).")
    loss: str = param("prob", "Objective: prob (the true class's probability lowered, the target's raised), "
                              "margin, ce or dlr.")

    def _validate(self) -> None:
        super()._validate()
        check_choice("basis", self.basis, BASES)
        if self.step is not None:
            check_range("step", self.step, low=0.0)

    def _objectives(self) -> dict[str, Objective]:
        return {"prob": probability, **LOSSES}

    @property
    def step_size(self) -> float:
        if self.step is not None:
            return self.step
        return DEFAULT_STEP[type(self.norm_obj)](self.eps)

    def _start(self, search: ScoreSearch, ids: Tensor) -> WorkSet:
        x0 = search.oracle.x[ids]
        c, h, w = x0.shape[1:]
        key = search.oracle.rng.uniform(ids, (c * h * w,))
        if self.basis == "dct":  # low-frequency rings first, random inside a ring
            u = torch.arange(h, device=key.device)[:, None]
            v = torch.arange(w, device=key.device)[None, :]
            key = key + torch.maximum(u, v).flatten().repeat(c)
        order = key.argsort(dim=1).to(x0.device)
        # k: the direction each sample is at; plus: whether its next query is the second half (x + q) of it
        return search.start(x0, ids, order=order, k=torch.zeros_like(ids), plus=torch.zeros_like(ids, dtype=torch.bool))

    def _direction(self, coord: Tensor, like: Tensor) -> Tensor:
        """Basis images for the flat coordinates ``coord`` (one per sample), ``step_size`` long in the norm."""
        n, c, h, w = like.shape
        if self.basis == "pixel":
            return torch.zeros(n, c * h * w, dtype=like.dtype, device=like.device).scatter_(
                1, coord[:, None], self.step_size).reshape(like.shape)
        ch, u, v = coord // (h * w), (coord // w) % h, coord % w
        rows, cols = dct_matrix(h).to(like)[u], dct_matrix(w).to(like)[v]
        image = rows[:, :, None] * cols[:, None, :]
        out = torch.zeros_like(like)
        out[torch.arange(n, device=like.device), ch] = image
        return self.norm_obj.rescale(out, self.step_size)

    def _step(self, search: ScoreSearch, work: WorkSet) -> None:
        """One query per sample, the next of its own walk: ``x - q`` for a new direction ``q``; where that does
        not improve the objective, ``x + q`` at the sample's next step; then the next direction. Samples at either
        half share one model call, so every call serves the whole work set (each sample's queries are those of
        the sequential walk)."""
        x0 = search.oracle.x[work.ids]
        order = work.order
        q = self._direction(order.gather(1, (work.k % order.shape[1])[:, None])[:, 0], x0)
        sign = per_sample(torch.where(work.plus, 1.0, -1.0), q)
        moved = search.accept(work, search.clip(x0, work.x + sign * q))
        work.k = work.k + (work.plus | moved).long()
        work.plus = ~work.plus & ~moved
