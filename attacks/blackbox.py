"""What the black-box attacks share: their base classes, the work-set bookkeeping, and the common search steps.

* :class:`ScoreAttack` — sees scores through a :class:`~attacks.oracle.QueryOracle`, stays inside an Lp ball of
  radius ``eps``, at most ``max_queries`` queries per sample. Subclasses write ``_start`` (the first query of some
  samples) and ``_step`` (one iteration); :meth:`ScoreAttack._run` is the one loop that drops a sample as soon as it
  is fooled or cannot pay for another iteration, and refills the work set with samples not yet started (each
  sample counts its own iterations, ``work.it``), so that model calls stay full until the last samples.
* :class:`DecisionAttack` — sees labels only and *minimizes* the perturbation from an adversarial starting point.
  With ``eps=None`` it spends its budget shrinking the perturbation and reports the norm reached; with ``eps`` a
  sample stops as soon as an adversarial point within ``eps`` is found (and counts as a success only then).
* The samples still worked on are a :class:`~attacks.workset.WorkSet` (``work.ids``: their batch positions; the
  search state as named fields: ``work.x``, ``work.logits``, ...) over the run's :class:`~attacks.workset.Results`;
  retiring a sample compacts every field at once, so every model call serves exactly the samples that still need
  it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from attacks.base import (
    MAX_BATCH, MAX_QUERIES, BoundedAttack, Context, MinNormAttack, check_choice, check_int, check_range,
)
from attacks.losses import LOSSES, Objective
from attacks.norms import Norm, per_sample
from attacks.oracle import QueryOracle
from attacks.params import param
from attacks.rng import SampleRNG
from attacks.workset import Results, WorkSet


def rows_per_call_field():
    """The ``rows_per_call`` field of every black-box attack: the most query rows one model call runs (None: the
    oracle's measured default for the device, :func:`attacks.oracle.default_rows_per_call`). A runtime setting: it
    changes speed, never results or counts, and is left out of :meth:`~attacks.base.Attack.config`."""
    return param(None, "Most query rows one model call runs (None: measured per device). Speed only.", runtime=True)

#: Batches of samples a score-based attack takes per call from :func:`attacks.evaluate` (see
#: :meth:`ScoreAttack.samples_per_call`): its work set stays one model call wide either way.
REFILL_BATCHES = 16

#: Probes per sample in one model call of the estimators (NES/SPSA pairs, HopSkipJump's boundary samples): one call
#: serves every sample of the work set. Fixed, not derived from the batch size, so that each sample's random draws
#: (and its result) are the same whatever batch it is attacked in; it also bounds memory.
PROBES_PER_CALL = 32


def work_set_field():
    """The ``work_set`` field of the score-based attacks: the most samples iterated on at once (None:
    :func:`default_work_set`). A runtime setting like ``rows_per_call``: each sample's draws and iterations are its
    own, so it changes speed and memory only, never results or counts."""
    return param(None, "Most samples iterated on at once (None: one model call of them, fewer for large images). "
                       "Speed and memory only.", runtime=True)


#: Bytes of image state a default work set may hold (several copies of each image: current point, candidate, ...).
WORK_SET_BYTES = 1 << 30

#: Fewest samples a default work set holds (memory permitting), even when one model call holds fewer rows: an
#: iteration's fixed Python cost is then shared by several model calls' worth of samples.
MIN_WORK_SET = 1024


def default_work_set(x: Tensor, rows_per_call: int) -> int:
    """At least one full model call of samples (one query each per iteration) and at least :data:`MIN_WORK_SET`,
    fewer for large images (memory)."""
    sample_bytes = max(1, x[:1].numel() * x.element_size() * 8)
    return max(1, min(max(rows_per_call, MIN_WORK_SET), WORK_SET_BYTES // sample_bytes))


# -- score-based -------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ScoreAttack(BoundedAttack):
    """Base of the score-based attacks: ``eps`` (> 0) bounds the perturbation, ``max_queries`` the queries per sample.

    ``loss`` is the objective the search maximizes (``margin`` by default: it is positive exactly when the sample is
    fooled).
    """

    kind: ClassVar[str] = "score"
    supported_norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    positive_budget: ClassVar[bool] = True

    max_queries: int = param(1000, "Query budget per image (forward passes).", fast=300)
    loss: str = param("margin", "Objective the search maximizes: margin, ce or dlr.")
    rows_per_call: Optional[int] = rows_per_call_field()
    work_set: Optional[int] = work_set_field()

    def _validate(self) -> None:
        super()._validate()
        check_int("max_queries", self.max_queries, high=MAX_QUERIES)
        check_choice("loss", self.loss, self._objectives())
        for name in ("rows_per_call", "work_set"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), high=MAX_BATCH)

    def samples_per_call(self, batch_size: int) -> int:
        """Samples a caller should hand over per call: many batches at once, since the work set is refilled as
        samples finish (the slow tail of few samples, whose per-iteration costs are fixed, then comes once per call
        instead of once per batch)."""
        return batch_size * REFILL_BATCHES

    def _objectives(self) -> dict[str, Objective]:
        """The objectives ``loss`` may name."""
        return LOSSES

    def _iteration_cost(self) -> int:
        """Queries one iteration needs per sample; a sample with fewer left stops."""
        return 1

    def _start(self, search: "ScoreSearch", ids: Tensor) -> WorkSet:
        """Query the starting points of the samples at ``ids``; return their work set (fields ``x``, ``logits``,
        ``value``, ``fooled`` and any state of the attack's own)."""
        raise NotImplementedError

    def _step(self, search: "ScoreSearch", work: WorkSet) -> None:
        """One iteration over the work set (``work.it``: each sample's iterations so far), in place; must refresh
        ``work.fooled``."""
        raise NotImplementedError

    def _run(self, ctx: Context) -> tuple[Tensor, Tensor]:
        oracle = QueryOracle(ctx, "score", self.max_queries, self.rows_per_call)
        search = ScoreSearch(oracle, self._objectives()[self.loss], self.norm_obj, self.eps)
        size = self.work_set or default_work_set(ctx.x, oracle.rows_per_call)
        work: Optional[WorkSet] = None
        started = 0
        while True:
            live = 0 if work is None else len(work)
            if started < ctx.n and live <= size // 2:  # refill in chunks of at least half the work set
                ids = torch.arange(started, min(ctx.n, started + size - live), device=ctx.x.device)
                new = self._start(search, ids)
                new.it = torch.zeros_like(ids)
                if work is None:
                    work = new
                else:
                    work.join(new)
                started += ids.numel()
            assert work is not None
            done = work.fooled | (search.oracle.remaining(work.ids) < self._iteration_cost())
            work.retire(done, work.x, work.logits)
            if work.empty:
                if started == ctx.n:
                    return search.results.x_adv, search.results.logits
                continue
            self._step(search, work)
            work.it = work.it + 1


class ScoreSearch:
    """The tools of one score-based run: the oracle, the objective, projection onto the ball, and the results."""

    def __init__(self, oracle: QueryOracle, objective: Objective, norm: Norm, eps: float):
        self.oracle = oracle
        self.objective = objective
        self.norm = norm
        self.eps = eps
        self.results = Results(oracle.x)

    def clip(self, x0: Tensor, x: Tensor) -> Tensor:
        """:meth:`Norm.clip <attacks.norms.Norm.clip>` with the run's budget: the point of the ball around ``x0``
        closest to ``x``, clamped to [0, 1]."""
        return self.norm.clip(x0, x, self.eps)

    def evaluate(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query ``x`` (one row per sample at ``ids``): returns (logits, objective value, fooled)."""
        logits = self.oracle.scores(x, ids)
        y, t = self.oracle.label_of(ids)
        return logits, self.objective(logits, y, t), self.oracle.meets_goal(logits.argmax(dim=1), ids)

    def start(self, x: Tensor, ids: Tensor, **extra: Tensor) -> WorkSet:
        """A work set of the samples at ``ids`` starting at ``x`` (one query per sample): fields ``x``, ``logits``,
        ``value`` (the objective), ``fooled`` and ``extra``."""
        logits, value, fooled = self.evaluate(x, ids)
        return WorkSet(self.results, ids, x=x, logits=logits, value=value, fooled=fooled, **extra)

    def accept(self, work: WorkSet, cand: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Query ``cand`` for the samples where ``mask`` holds (all by default) and keep it where it improves the
        objective or fools the model (greedy random search). Updates ``work`` in place; returns where it moved."""
        if mask is None:  # every sample: no gathering, and selects instead of masked copies (no index lists)
            logits, value, fooled = self.evaluate(cand, work.ids)
            moved = (value > work.value) | fooled
            work.x = torch.where(per_sample(moved, cand), cand, work.x)
            work.logits = torch.where(per_sample(moved, logits), logits, work.logits)
            work.value = torch.where(moved, value, work.value)
            work.fooled |= fooled
            return moved
        moved = torch.zeros_like(work.fooled)
        pos = mask.nonzero()[:, 0]
        if pos.numel() == 0:
            return moved
        cand = cand[pos]
        logits, value, fooled = self.evaluate(cand, work.ids[pos])
        take = (value > work.value[pos]) | fooled
        won = pos[take]
        work.x[won], work.logits[won], work.value[won] = cand[take], logits[take], value[take]
        work.fooled[pos] |= fooled
        moved[won] = True
        return moved


@dataclass(frozen=True, kw_only=True)
class EstimatedGradientAttack(ScoreAttack):
    """Projected ascent on a gradient estimated from ``samples`` queries (antithetic pairs ``x +- sigma * u``).

    Subclasses choose the noise ``u`` (``_noise``) and how an estimate moves the iterate (``_update``), with step size
    ``alpha`` (see :attr:`step_size`). Each iteration costs ``samples + 1`` queries per sample: the estimate, then
    one query of the new iterate, which tells whether it fools the model. The starting point (``x``) costs one.
    """

    samples: int = param(50, "Queries per gradient estimate (even: antithetic pairs).", fast=10)
    sigma: float = param(1e-3, "Distance of the probes x +- sigma * u, in [0, 1] pixel units.")
    alpha: Optional[float] = param(None, "Step size in [0, 1] pixel units (SPSA: Adam's learning rate); None: "
                                   "2.5 * eps / the iterations max_queries pays for.")

    def _validate(self) -> None:
        super()._validate()
        check_int("samples", self.samples, low=2)
        if self.samples % 2:
            raise ValueError(f"samples must be even (antithetic pairs), got {self.samples}")
        check_range("sigma", self.sigma, low=0.0, high=1.0)
        if self.alpha is not None:
            check_range("alpha", self.alpha, low=0.0)

    def _iteration_cost(self) -> int:
        return self.samples + 1

    @property
    def step_size(self) -> float:
        """``alpha``, or PGD's rule ``2.5 eps / iterations`` for the iterations the budget pays for (so the walk
        can cross the ball whatever the budget)."""
        if self.alpha is not None:
            return self.alpha
        return 2.5 * self.eps / max(1, (self.max_queries - 1) // self._iteration_cost())

    def _noise(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Probe directions of shape ``(len(idx), *shape)`` from the streams of the samples at ``idx``."""
        raise NotImplementedError

    def _update(self, search: ScoreSearch, work: WorkSet, grad: Tensor) -> Tensor:
        """The next iterate (before projection); updates any optimizer memory kept in ``work``."""
        raise NotImplementedError

    def _start(self, search: ScoreSearch, ids: Tensor) -> WorkSet:
        return search.start(search.oracle.x[ids], ids)  # indexing copies: the work set owns its points

    def _step(self, search: ScoreSearch, work: WorkSet) -> None:
        grad = self._estimate(search, work)
        nxt = self._update(search, work, grad)
        pos = (~work.fooled).nonzero()[:, 0]  # samples a probe of the estimate has not fooled already
        if pos.numel():
            ids = work.ids[pos]
            new = search.clip(search.oracle.x[ids], nxt[pos])
            logits, value, fooled = search.evaluate(new, ids)
            work.x[pos], work.logits[pos], work.value[pos], work.fooled[pos] = new, logits, value, fooled

    def _estimate(self, search: ScoreSearch, work: WorkSet) -> Tensor:
        """``mean_u [f(x + sigma u) - f(x - sigma u)] u / (2 sigma)`` over ``samples / 2`` pairs.

        Probes are projected onto the ball and the box, so every query is a valid candidate: a probe that fools the
        model becomes its sample's result at once (``work`` is updated in place) and the sample gets no further
        queries.
        """
        x, ids = work.x, work.ids
        pairs = self.samples // 2
        grad = torch.zeros_like(x)
        per_call = PROBES_PER_CALL // 2
        for first in range(0, pairs, per_call):
            live = (~work.fooled).nonzero()[:, 0]
            if live.numel() == 0:
                break
            k = min(per_call, pairs - first)
            # One round queries 2k probes of every live sample. It runs in groups of samples that fill one model call
            # of the oracle's size, so the probes, their projection and the estimate stay in cache; the draws, the
            # queries and the result are the same as in one call (each sample's stream is its own).
            group = max(1, search.oracle.rows_per_call // (2 * k))
            for g in range(0, live.numel(), group):
                pos = live[g:g + group]
                m = pos.numel()
                u = self._noise(search.oracle.rng, ids[pos], (k, *x.shape[1:])).to(x)
                su = u * self.sigma
                xp = x[pos, None]
                probes = torch.cat([xp + su, xp - su], dim=1).flatten(0, 1)
                rows = ids[pos].repeat_interleave(2 * k)
                probes = search.clip(search.oracle.x[rows], probes)
                logits, f, fooled = search.evaluate(probes, rows)
                f = f.reshape(m, 2 * k)
                diff = (f[:, :k] - f[:, k:]).reshape(m, k, *([1] * (x.dim() - 1)))
                grad[pos] += (diff * u).sum(dim=1)
                self._adopt(work, pos, fooled.reshape(m, 2 * k), probes, logits, f.flatten())
        return grad / (2 * self.sigma * pairs)

    @staticmethod
    def _adopt(work: WorkSet, pos: Tensor, fooled: Tensor, probes: Tensor, logits: Tensor, values: Tensor) -> None:
        """Make the first fooling probe of each sample at ``pos`` (rows of ``fooled``) that sample's result."""
        hit = fooled.any(dim=1)
        if not bool(hit.any()):
            return
        row = (torch.arange(pos.numel(), device=pos.device) * fooled.shape[1] + fooled.to(torch.int8).argmax(dim=1))[hit]
        won = pos[hit]
        work.x[won], work.logits[won], work.value[won] = probes[row], logits[row], values[row]
        work.fooled[won] = True


# -- decision-based ----------------------------------------------------------------------------------------------
#: Uniform-noise draws per sample when looking for an adversarial starting point.
INIT_TRIES = 100


@dataclass(frozen=True, kw_only=True)
class DecisionAttack(MinNormAttack):
    """Base of the decision-based (label-only) attacks, which minimize the perturbation.

    ``eps=None``: minimize for the whole budget and report the norm reached. ``eps`` given (> 0): success means an
    adversarial point within ``eps``; a sample stops as soon as it has one, and a sample that ends with a larger
    perturbation is discarded (``x_adv = x``), as in every :class:`~attacks.base.MinNormAttack`.
    """

    kind: ClassVar[str] = "decision"
    supported_norms: ClassVar[tuple[str, ...]] = ("l2",)
    positive_budget: ClassVar[bool] = True
    targeted_ok: ClassVar[bool] = False  # a targeted start needs an image of the target class; there is no argument for it

    max_queries: int = param(1000, "Query budget per image (label queries).", fast=300)
    rows_per_call: Optional[int] = rows_per_call_field()

    def _validate(self) -> None:
        super()._validate()
        check_int("max_queries", self.max_queries, high=MAX_QUERIES)
        if self.rows_per_call is not None:
            check_int("rows_per_call", self.rows_per_call, high=MAX_BATCH)

    def _minimize(self, search: "DecisionSearch", work: WorkSet) -> None:
        """Shrink the perturbation of every sample in the work set, retiring samples as they finish."""
        raise NotImplementedError

    def _run(self, ctx: Context) -> tuple[Tensor, None]:
        search = DecisionSearch(QueryOracle(ctx, "decision", self.max_queries, self.rows_per_call), self.norm_obj,
                                self.eps)
        work = search.start()
        self._minimize(search, work)
        work.retire_all(work.best)
        return search.results.x_adv, None


class DecisionSearch:
    """The tools of one decision-based run: oracle, distances, the common start, bisection and the best points."""

    def __init__(self, oracle: QueryOracle, norm: Norm, eps: Optional[float]):
        self.oracle = oracle
        self.norm = norm
        self.eps = eps
        self.results = Results(oracle.x)

    def distance(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.norm.measure(x - self.oracle.x[ids])

    def start(self) -> WorkSet:
        """Blended uniform noise: per sample, uniform noise until one is adversarial, then the blend
        ``(1 - a) x + a noise`` with the smallest ``a`` found by bisection. Samples without an adversarial start keep
        ``x`` (they fail). Returns the work set with fields ``x`` and ``best`` (the start) and ``dist`` (its norm)."""
        x0 = self.oracle.x
        ids = torch.arange(x0.shape[0], device=x0.device)
        noise, found = self._uniform_adversarial(ids)
        work = WorkSet(self.results, ids, x=x0.clone(), noise=noise)
        work.retire(~found, work.x)
        ones = torch.ones(len(work), device=x0.device, dtype=x0.dtype)
        a = self.bisect(work.ids, lambda pos, t: self.blend(work.ids[pos], work.noise[pos], t), high=ones,
                        tol=ones * 1e-3)
        work.x, work.noise = self.blend(work.ids, work.noise, a), None
        work.best, work.dist = work.x.clone(), self.distance(work.x, work.ids)
        return work

    def _uniform_adversarial(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        x0 = self.oracle.x[ids]
        noise = x0.clone()
        found = torch.zeros(ids.numel(), dtype=torch.bool, device=x0.device)
        for _ in range(INIT_TRIES):
            pos = ((~found) & (self.oracle.remaining(ids) >= 1)).nonzero()[:, 0]
            if pos.numel() == 0:
                break
            draw = self.oracle.rng.uniform(ids[pos], x0.shape[1:]).to(x0)
            adv = self.oracle.is_adversarial(draw, ids[pos])
            noise[pos[adv]] = draw[adv]
            found[pos[adv]] = True
        return noise, found

    def blend(self, ids: Tensor, adv: Tensor, a: Tensor) -> Tensor:
        """``(1 - a) x + a adv`` per sample: the segment from the clean input to ``adv``."""
        x0 = self.oracle.x[ids]
        return x0 + per_sample(a, x0) * (adv - x0)

    def bisect(self, ids: Tensor, point: Callable[[Tensor, Tensor], Tensor], high: Tensor, tol: Tensor) -> Tensor:
        """Smallest ``t`` in ``[0, high]`` (per sample) for which ``point(pos, t)`` is adversarial, to within ``tol``.

        ``point(high)`` must be adversarial and ``point(0)`` is the clean input. Each round queries only the samples
        whose interval is still wider than ``tol`` and that have budget left; the returned ``t`` is always on the
        adversarial side."""
        low = torch.zeros_like(high)
        high = high.clone()
        while True:
            pos = ((high - low > tol) & (self.oracle.remaining(ids) >= 1)).nonzero()[:, 0]
            if pos.numel() == 0:
                return high
            mid = (low[pos] + high[pos]) / 2
            adv = self.oracle.is_adversarial(point(pos, mid).clamp(0.0, 1.0), ids[pos])
            high[pos] = torch.where(adv, mid, high[pos])
            low[pos] = torch.where(adv, low[pos], mid)

    def offer(self, work: WorkSet, cand: Tensor, mask: Optional[Tensor] = None, at: Optional[Tensor] = None) -> None:
        """Make the known-adversarial ``cand`` each sample's ``best`` where it is closer (and ``mask`` holds).

        ``cand`` has a row per sample of the work set, or, with ``at``, a row for each work-set position in ``at``."""
        if at is not None:
            if at.numel():
                dist = self.distance(cand, work.ids[at])
                better = dist < work.dist[at]
                won = at[better]
                work.best[won], work.dist[won] = cand[better], dist[better]
            return
        dist = self.distance(cand, work.ids)
        better = dist < work.dist
        if mask is not None:
            better &= mask
        work.best = torch.where(per_sample(better, cand), cand, work.best)
        work.dist = torch.where(better, dist, work.dist)

    def settle(self, work: WorkSet, spend_at_least: int = 1) -> None:
        """Retire the samples that are done: within ``eps`` (when given) or without ``spend_at_least`` queries left."""
        done = self.oracle.remaining(work.ids) < spend_at_least
        if self.eps is not None:
            done |= work.dist <= self.eps
        work.retire(done, work.best)

