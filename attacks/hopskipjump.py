"""HopSkipJump — decision-based attack that estimates the boundary's normal from labels alone.

Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack", IEEE S&P 2020. From an
adversarial start (blended uniform noise), each iteration ``t``:

1. estimates the normal of the decision boundary at the current boundary point from ``init_evals * sqrt(t)``
   (at most ``max_evals``) labels at random points ``delta`` away (Monte-Carlo, with the paper's baseline);
2. steps along it (its sign under Linf) by ``dist / sqrt(t)``, halving the step until the point is adversarial
   (geometric progression);
3. bisects back to the boundary over the radius of the ball around the clean input onto which the point is
   projected (under L2: along the segment to the clean input), to within ``theta`` times the distance (L2,
   ``theta = gamma / d^1.5``) or ``min(theta, theta * distance)`` (Linf, ``theta = gamma / d^2``).

``delta`` is 0.1 at ``t = 1``, then ``sqrt(d) theta dist`` (L2) or ``d theta dist`` (Linf), as in the paper. Under a
query budget each sample's estimate is cut so the step and the bisection still fit; a sample stops when even a
one-query estimate would not. Defaults are the paper's (100 initial evaluations, at most 10,000, gamma 1).

>>> HopSkipJump(max_queries=1000)(model, x, y).norms.median()       # L2 reached; pass eps= for a success rate
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from attacks.base import MAX_QUERIES, check_int, check_range
from attacks.blackbox import PROBES_PER_CALL, DecisionAttack, DecisionSearch
from attacks.norms import L2, Linf, per_sample
from attacks.params import param
from attacks.registry import register
from attacks.rng import SampleRNG
from attacks.workset import WorkSet

_MAX_HALVINGS = 30  # geometric step search: give up (stay on the boundary point) after this many halvings
_L2 = L2()  # probes are unit vectors in L2 under every norm


@dataclass(frozen=True)
class Geometry:
    """The paper's choices for one norm.

    ``spread(d)``: how theta and the probe radius grow with the dimension ``d`` (``theta = gamma / (d spread(d))``,
    ``delta = spread(d) theta dist``); ``probes``: random directions ``(len(idx), *shape)`` for the normal's
    estimate; ``direction``: the step's direction from the estimate; ``capped``: whether the bisection's tolerance
    is capped at theta.
    """

    spread: Callable[[int], float]
    probes: Callable[[SampleRNG, Tensor, tuple[int, ...]], Tensor]
    direction: Callable[[Tensor], Tensor]
    capped: bool


GEOMETRY = {
    L2: Geometry(spread=math.sqrt, probes=lambda rng, idx, shape: rng.normal(idx, shape),
                 direction=_L2.normalize, capped=False),
    Linf: Geometry(spread=lambda d: d, probes=lambda rng, idx, shape: rng.uniform(idx, shape) * 2 - 1,
                   direction=Linf().steepest, capped=True),
}


@register
@dataclass(frozen=True, kw_only=True)
class HopSkipJump(DecisionAttack):
    name = "hopskipjump"
    supported_norms = ("l2", "linf")
    description = "HopSkipJump: boundary-normal estimates from labels, minimum norm (Chen et al. 2020)"

    init_evals: int = param(100, "Label queries of the first boundary-normal estimate (then init_evals * sqrt(t) "
                                 "at iteration t).", fast=20)
    max_evals: int = param(10000, "Most label queries of one boundary-normal estimate.")
    gamma: float = param(1.0, "Bisection precision: theta = gamma / d^1.5 (L2) or gamma / d^2 (Linf), d the "
                              "input size.")

    def _validate(self) -> None:
        super()._validate()
        check_int("init_evals", self.init_evals, high=MAX_QUERIES)
        check_int("max_evals", self.max_evals, low=self.init_evals, high=MAX_QUERIES)
        check_range("gamma", self.gamma, low=0.0)

    @property
    def geometry(self) -> Geometry:
        return GEOMETRY[type(self.norm_obj)]

    def _theta(self, d: int) -> float:
        return self.gamma / (d * self.geometry.spread(d))

    def _minimize(self, search: DecisionSearch, work: WorkSet) -> None:
        d = search.oracle.x[0].numel()
        theta = self._theta(d)
        reserve = math.ceil(math.log2(1 / theta)) + 1  # a full bisection and one step query
        work.post = work.dist  # the distance after the last bisection
        t = 1
        while True:
            search.settle(work, spend_at_least=reserve + 1)
            if work.empty:
                return
            spread = self.geometry.spread(d)
            delta = torch.full_like(work.post, 0.1) if t == 1 else spread * theta * work.post
            evals = (search.oracle.remaining(work.ids) - reserve).clamp(
                max=min(int(self.init_evals * math.sqrt(t)), self.max_evals))
            update = self._normal(search, work, delta, evals)
            self._jump(search, work, update, t, theta)
            t += 1

    # -- 1. the boundary normal ----------------------------------------------------------------------------------
    def _normal(self, search: DecisionSearch, work: WorkSet, delta: Tensor, evals: Tensor) -> Tensor:
        """Monte-Carlo estimate of the boundary normal at ``work.x``, ``evals[i]`` labels for sample ``i``.

        Each model call takes up to :data:`PROBES_PER_CALL` probes of every sample that still needs some, laid out
        as ``(samples, probes, pixels)``, so the probes' two sums (of the directions, and of the directions weighted by
        the labels' signs) are reductions over the middle axis, in an order that does not depend on the batch."""
        cur, ids = work.x, work.ids
        n, d = cur.shape[0], cur[0].numel()
        rng = search.oracle.rng
        flat = cur.reshape(n, d)
        sums = torch.zeros(n, 2, d, dtype=cur.dtype, device=cur.device)  # sum of rv, and of phi * rv
        phi_sum = torch.zeros(n, dtype=cur.dtype, device=cur.device)
        most = int(evals.max()) if n else 0
        for first in range(0, most, PROBES_PER_CALL):
            k = min(PROBES_PER_CALL, most - first)
            need = (evals > first).nonzero()[:, 0]  # samples drawing in this call
            valid = torch.arange(first, first + k, device=cur.device)[None, :] < evals[need, None]  # (len(need), k)
            full = bool(valid.all())
            rv = self.geometry.probes(rng, ids[need], (k, *cur.shape[1:])).to(cur).reshape(need.numel(), k, d)
            rv /= rv.norm(dim=2, keepdim=True).clamp_min(1e-12)
            here = flat[need, None]
            step = delta[need].reshape(-1, 1, 1)
            probe = torch.addcmul(here, rv, step).clamp_(0.0, 1.0)
            torch.sub(probe, here, out=rv).div_(step)  # the direction actually probed, after clamping
            rows = ids[need, None].expand(-1, k)
            if full:
                adv = search.oracle.is_adversarial(probe.reshape(-1, *cur.shape[1:]), rows.reshape(-1))
                phi = adv.reshape(need.numel(), k).to(cur.dtype) * 2 - 1
            else:  # the samples whose budget ends inside this call: their later probes are drawn, never queried
                adv = search.oracle.is_adversarial(probe[valid].reshape(-1, *cur.shape[1:]), rows[valid])
                phi = torch.zeros(valid.shape, dtype=cur.dtype, device=cur.device)
                phi[valid] = adv.to(cur.dtype) * 2 - 1
            if not full:
                rv *= valid[:, :, None]
            sums[need, 0] += rv.sum(dim=1)
            sums[need, 1] += rv.mul_(phi[:, :, None]).sum(dim=1)
            phi_sum[need] += phi.sum(dim=1)
        count = evals.clamp_min(1).to(cur.dtype)
        mean_phi = (phi_sum / count)[:, None]
        mean_rv = sums[:, 0] / count[:, None]
        grad = torch.where(mean_phi.abs() == 1, mean_phi * mean_rv, sums[:, 1] / count[:, None] - mean_phi * mean_rv)
        return self.geometry.direction(grad.reshape(cur.shape))

    # -- 2. the step and 3. the bisection back to the boundary ----------------------------------------------------
    def _jump(self, search: DecisionSearch, work: WorkSet, update: Tensor, t: int, theta: float) -> None:
        ids, cur = work.ids, work.x
        size = search.distance(cur, ids) / math.sqrt(t)
        moved = torch.zeros_like(size, dtype=torch.bool)
        for _ in range(_MAX_HALVINGS):
            pos = ((~moved) & (search.oracle.remaining(ids) >= 1)).nonzero()[:, 0]
            if pos.numel() == 0:
                break
            cand = (cur[pos] + per_sample(size[pos], update) * update[pos]).clamp(0.0, 1.0)
            adv = search.oracle.is_adversarial(cand, ids[pos])
            cur[pos[adv]] = cand[adv]
            moved[pos[adv]] = True
            size[pos[~adv]] /= 2
        search.offer(work, cur)
        # back to the boundary: the smallest ball around x0 whose projection of `cur` is still adversarial
        # (under L2 that projection is the segment from x0 to `cur`)
        x0 = search.oracle.x[ids]
        radius = search.distance(cur, ids)
        tol = (theta * radius).clamp(max=theta) if self.geometry.capped else theta * radius
        point = lambda pos, r: x0[pos] + search.norm.project(cur[pos] - x0[pos], r)  # noqa: E731
        found = search.bisect(ids, point, high=radius, tol=tol)
        work.post = radius
        work.x = point(torch.arange(ids.numel(), device=cur.device), found).clamp(0.0, 1.0)
        search.offer(work, work.x)
