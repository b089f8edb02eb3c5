"""Boundary attack — decision-based random walk along the decision boundary (L2).

Brendel, Rauber & Bethge, "Decision-Based Adversarial Attacks: Reliable Attacks Against Black-Box Machine Learning
Models", ICLR 2018. From an adversarial start (blended uniform noise), each step draws a Gaussian direction
orthogonal to ``x - x_adv``, moves ``spherical_step * dist`` along it and back onto the sphere of radius ``dist``
around ``x`` (the orthogonal step), then ``source_step * dist`` towards ``x``; the result is kept if it is still
adversarial. The orthogonal point is queried first and the full step only when it is adversarial (one or two
queries per step). Every ``adapt_every`` steps the step sizes adapt by ``step_adaptation``: both grow when more than
half of the orthogonal points were adversarial and shrink below 20 %; the source step alone grows when more than
25 % of the full steps succeeded and shrinks below 10 % (the thresholds of the reference implementation; the source
step is capped at 0.5 so a step never overshoots ``x``). A sample stops when its source step falls below 1e-7.

Defaults are the paper's: both steps 0.01, adaptation factor 1.5.

>>> Boundary(max_queries=1000)(model, x, y).norms.median()          # L2 reached; pass eps= for a success rate
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import check_int, check_range
from attacks.blackbox import DecisionAttack, DecisionSearch
from attacks.params import param
from attacks.registry import register
from attacks.workset import WorkSet

_CONVERGED = 1e-7
_TINY = 1e-12  # floor of a distance that divides


@register
@dataclass(frozen=True, kw_only=True)
class Boundary(DecisionAttack):
    name = "boundary"
    description = "Boundary attack: random walk along the decision boundary, minimum L2 (Brendel et al. 2018)"

    spherical_step: float = param(0.01, "Orthogonal step, a fraction of the current distance to x.")
    source_step: float = param(0.01, "Step towards x, a fraction of the current distance to x.")
    step_adaptation: float = param(1.5, "Factor by which the steps grow or shrink when they adapt.")
    adapt_every: int = param(10, "Steps between two adaptations of the step sizes.")

    def _validate(self) -> None:
        super()._validate()
        check_range("spherical_step", self.spherical_step, low=0.0)
        check_range("source_step", self.source_step, low=0.0, high=1.0, high_inclusive=False)
        check_range("step_adaptation", self.step_adaptation, low=1.0)
        check_int("adapt_every", self.adapt_every)

    def _minimize(self, search: DecisionSearch, work: WorkSet) -> None:
        like = work.dist
        # per sample: the two step sizes, and the trials and successes of each step since the last adaptation
        work.spherical = torch.full_like(like, self.spherical_step)
        work.source = torch.full_like(like, self.source_step)
        work.trials, work.sph_ok, work.src_ok = torch.zeros_like(like), torch.zeros_like(like), torch.zeros_like(like)
        step = 0
        while True:
            search.settle(work)
            work.retire(work.source < _CONVERGED, work.best)
            if work.empty:
                return
            self._walk(search, work)
            step += 1
            if step % self.adapt_every == 0:
                self._adapt(work)

    def _walk(self, search: DecisionSearch, work: WorkSet) -> None:
        """One orthogonal step, and a step towards the clean input where the orthogonal point is adversarial.

        Works on flattened rows in place: the draw is made orthogonal to ``x - x_adv`` by subtracting its
        component along it, so no unit vector is formed, and the step towards ``x`` is a linear interpolation."""
        ids, cur = work.ids, work.best
        n, shape = cur.shape[0], cur.shape[1:]
        x0 = search.oracle.x[ids].reshape(n, -1)
        to_x = x0 - cur.reshape(n, -1)
        dist = to_x.norm(dim=1)
        eta = search.oracle.rng.normal(ids, shape).to(cur).reshape(n, -1)
        along = torch.linalg.vecdot(eta, to_x) / (dist * dist).clamp_min(_TINY)
        eta.addcmul_(to_x, along[:, None], value=-1.0)
        eta.mul_((work.spherical * dist / eta.norm(dim=1).clamp_min(_TINY))[:, None])
        # the orthogonal point x0 + (x_adv + eta - x0) / sqrt(1 + s^2), on the sphere of radius dist around x0
        sphere = eta.sub_(to_x).div_((1 + work.spherical ** 2).sqrt()[:, None]).add_(x0).clamp_(0.0, 1.0)
        sph_adv = search.oracle.is_adversarial(sphere.reshape(n, *shape), ids)

        pos = (sph_adv & (search.oracle.remaining(ids) >= 1)).nonzero()[:, 0]
        adv = torch.zeros_like(sph_adv)
        if pos.numel():
            # towards x0 by source * dist, measured from the sphere (the orthogonal step left it slightly)
            back_norm = (x0[pos] - sphere[pos]).norm(dim=1).clamp_min(_TINY)
            length = (work.source[pos] * dist[pos] + back_norm - dist[pos]).clamp_min(0.0)
            cand = torch.lerp(sphere[pos], x0[pos], (length / back_norm)[:, None]).clamp_(0.0, 1.0)
            cand = cand.reshape(-1, *shape)
            won = search.oracle.is_adversarial(cand, ids[pos])
            adv[pos] = won
            search.offer(work, cand[won], at=pos[won])
        work.trials += 1
        work.sph_ok += sph_adv.to(cur.dtype)
        work.src_ok += adv.to(cur.dtype)

    def _adapt(self, work: WorkSet) -> None:
        """Tune the step sizes from the success rates since the last adaptation, then reset the counts."""
        f = self.step_adaptation
        sph_rate = work.sph_ok / work.trials.clamp_min(1)
        src_rate = work.src_ok / work.trials.clamp_min(1)
        both = torch.where(sph_rate > 0.5, f, torch.where(sph_rate < 0.2, 1 / f, 1.0))
        source = torch.where(src_rate > 0.25, f, torch.where(src_rate < 0.1, 1 / f, 1.0))
        work.spherical = work.spherical * both
        work.source = (work.source * both * source).clamp(max=0.5)
        work.trials, work.sph_ok, work.src_ok = (torch.zeros_like(work.trials), torch.zeros_like(work.sph_ok),
                                                 torch.zeros_like(work.src_ok))

