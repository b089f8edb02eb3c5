"""Square Attack — score-based random search over square-shaped updates.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial attack via random
search", ECCV 2020. Each iteration changes one random ``s x s`` window of the perturbation and keeps the change if
the margin loss improves (one query per sample per iteration). The window covers a fraction ``p`` of the image, and
``p`` follows the paper's piecewise-constant schedule from ``p_init`` (halved at 10, 50, 200, 500, 1000, 2000,
4000, 6000 and 8000 of 10,000 queries, rescaled to ``max_queries``).

* Linf: start from vertical stripes of +-eps; a window is set to +-eps (a random sign per channel), at a vertex
  of the ball.
* L2: start from a grid of pseudo-Gaussian bumps scaled to norm eps; a window receives a new bump plus its old
  content while the mass of a second window moves into it, then the whole perturbation is rescaled to norm eps.

Defaults: margin loss and the schedule as in the paper; ``p_init = 0.8``, the authors' own setting in AutoAttack
for every dataset (the paper's 0.05 Linf / 0.1 L2 are for 224 x 224 ImageNet images: on 28 x 28 images they
shrink the window to a single pixel within 100 of 1000 queries; on Fashion-MNIST at Linf 0.1, 0.8 fools 2 points
more images with half the median queries). Unlike the reference code, every image draws its own window position.

>>> Square(eps=0.1, max_queries=1000)(model, x, y).queries.float().median()
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from attacks.base import check_range
from attacks.blackbox import ScoreAttack, ScoreSearch, State, expand
from attacks.registry import register
from attacks.rng import SampleRNG

#: (end of the phase in queries out of 10,000, divisor of p_init) — the paper's schedule.
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))
_RESAMPLES = 10  # Linf: redraws of the signs when a proposal would leave the window unchanged


def p_schedule(p_init: float, it: int, budget: int) -> float:
    """Fraction of the image the window covers at iteration ``it`` of a ``budget``-query run."""
    t = int(it / budget * 10000)
    for end, divisor in _SCHEDULE:
        if t <= end:
            return p_init / divisor
    return p_init / 512


def rademacher(rng: SampleRNG, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Independent +-1 entries of shape ``(len(idx), *shape)`` from the streams of the samples at ``idx``."""
    return (rng.uniform(idx, shape) < 0.5).to(torch.float32) * 2 - 1


def _bump(a: int, b: int) -> Tensor:
    """The paper's pseudo-Gaussian bump on an ``a x b`` rectangle: nested boxes around the centre, box ``k`` adding
    ``1 / (k + 1)^2``, so a cell holds the tail sum from its Chebyshev distance to the centre on. Unit L2 norm."""
    k = max(a // 2, b // 2) + 1
    ring = torch.maximum((torch.arange(a) - a // 2).abs()[:, None], (torch.arange(b) - b // 2).abs()[None, :])
    tail = (1.0 / (torch.arange(k, dtype=torch.float32) + 1) ** 2).flip(0).cumsum(0).flip(0)
    out = tail[ring]
    return out / out.norm()


def _twin_bump(s: int) -> Tensor:
    """An ``s x s`` pattern: a bump on the upper half and a negated bump on the lower half, unit L2 norm."""
    top = _bump(s // 2, s) if s >= 2 else torch.zeros(0, s)
    out = torch.cat([top, -_bump(s - s // 2, s)], dim=0)
    return out / out.norm()


class _Windows:
    """One random ``s x s`` window per image (top-left corner uniform over the valid positions)."""

    def __init__(self, rng: SampleRNG, ids: Tensor, s: int, h: int, w: int):
        self.s = s
        self.rows, in_rows = self._offsets(rng.integers(ids, h - s + 1), s, h)
        self.cols, in_cols = self._offsets(rng.integers(ids, w - s + 1), s, w)
        self.mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (n, 1, h, w)

    @staticmethod
    def _offsets(start: Tensor, s: int, size: int) -> tuple[Tensor, Tensor]:
        rel = torch.arange(size, device=start.device)[None, :] - start[:, None]
        return rel.clamp(0, s - 1), (rel >= 0) & (rel < s)

    def place(self, pattern: Tensor) -> Tensor:
        """Per-image ``(n, s, s)`` patterns written into their windows of an otherwise zero ``(n, 1, h, w)``."""
        n = pattern.shape[0]
        vals = pattern[torch.arange(n, device=pattern.device)[:, None, None], self.rows[:, :, None], self.cols[:, None, :]]
        return vals[:, None] * self.mask


@register
@dataclass(frozen=True, kw_only=True)
class Square(ScoreAttack):
    """``p_init``: fraction of the image the window covers at the start."""

    name = "square"
    description = "Square Attack: random search over square windows, scores only (Andriushchenko et al. 2020)"

    p_init: float = 0.8

    def _validate(self) -> None:
        super()._validate()
        check_range("p_init", self.p_init, low=0.0, high=1.0)

    def _side(self, it: int, h: int, w: int) -> int:
        s = round((p_schedule(self.p_init, it, self.max_queries) * h * w) ** 0.5)
        if self.norm == "l2":  # the L2 update needs room for two half-bumps and a centre
            s = max(s, 3) + (max(s, 3) + 1) % 2
        return max(1, min(s, min(h, w) - 1))

    # -- start --------------------------------------------------------------------------------------------------
    def _start(self, search: ScoreSearch) -> State:
        x0 = search.oracle.x
        n, c, h, w = x0.shape
        ids = torch.arange(n, device=x0.device)
        if self.norm == "linf":  # vertical stripes of +-eps
            delta = self.eps * rademacher(search.oracle.rng, ids, (c, 1, w)).to(x0)
            # the two values a window can take, computed once: the ball's faces clamped to [0, 1]
            bounds = {"up": (x0 + self.eps).clamp(max=1.0), "down": (x0 - self.eps).clamp(min=0.0)}
        else:
            delta = self._bump_grid(search.oracle.rng, ids, c, h, w).to(x0)
            delta = delta * expand(self.eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12), delta)
            bounds = {}
        return search.start((x0 + delta).clamp(0.0, 1.0), ids, **bounds)

    @staticmethod
    def _bump_grid(rng: SampleRNG, ids: Tensor, c: int, h: int, w: int) -> Tensor:
        """The L2 start: a grid of ``h // 5``-sized twin bumps, each with a random sign per image and channel."""
        t = max(min(h, w) // 5, 1)
        nh, nw = h // t, w // t
        signs = rademacher(rng, ids, (c, nh, nw)).cpu()
        tiles = signs.repeat_interleave(t, dim=2).repeat_interleave(t, dim=3) * _twin_bump(t).repeat(nh, nw)
        out = torch.zeros(len(ids), c, h, w)
        top, left = (h - t * nh) // 2, (w - t * nw) // 2
        out[:, :, top:top + t * nh, left:left + t * nw] = tiles
        return out

    # -- one iteration ------------------------------------------------------------------------------------------
    def _step(self, search: ScoreSearch, state: State, it: int) -> State:
        ids = state["ids"]
        h, w = state["x"].shape[2:]
        win = _Windows(search.oracle.rng, ids, self._side(it, h, w), h, w)
        if self.norm == "linf":
            cand = self._linf_candidate(search.oracle.rng, ids, state["x"], state["up"], state["down"], win)
        else:
            cand = self._l2_candidate(search.oracle.rng, ids, state["x"], search.oracle.x[ids], win)
        search.accept(state, cand)
        return state

    def _linf_candidate(self, rng: SampleRNG, ids: Tensor, cur: Tensor, up: Tensor, down: Tensor,
                        win: _Windows) -> Tensor:
        """Set each image's window to ``x0 +- eps`` (``up``/``down``, clamped to [0, 1]; a random sign per channel),
        redrawing the signs of a proposal that would change nothing (rejection sampling on the signs alone: which
        sign moves which channel is known)."""
        c = cur.shape[1]
        moves_up = (((up - cur).abs() > 1e-7) & win.mask).flatten(2).any(dim=2)  # (n, c)
        moves_down = (((down - cur).abs() > 1e-7) & win.mask).flatten(2).any(dim=2)
        signs = rademacher(rng, ids, (c,)) > 0
        for _ in range(_RESAMPLES):
            idle = ~torch.where(signs, moves_up, moves_down).any(dim=1)
            if not bool(idle.any()):
                break
            signs[idle] = rademacher(rng, ids[idle], (c,)) > 0
        return torch.where(win.mask, torch.where(signs[:, :, None, None], up, down), cur)

    def _l2_candidate(self, rng: SampleRNG, ids: Tensor, cur: Tensor, x0: Tensor, win: _Windows) -> Tensor:
        """Move the mass of a second window into the first, add a fresh bump there, and rescale to norm ``eps``."""
        c, h, w = x0.shape[1:]
        other = _Windows(rng, ids, win.s, h, w)
        delta = cur - x0
        m1, both = win.mask.to(x0), (win.mask | other.mask).to(x0)
        window_norm = (delta * m1).flatten(2).norm(dim=2)[..., None, None]  # (n, c, 1, 1)
        union_norm = (delta * both).flatten(2).norm(dim=2)[..., None, None]
        total_sq = delta.flatten(1).pow(2).sum(dim=1)
        bump = _twin_bump(win.s).to(x0)
        flip = rng.uniform(ids, (1, 1)) < 0.5
        patterns = torch.where(flip, bump.t(), bump)
        fresh = win.place(patterns) * rademacher(rng, ids, (c, 1, 1)).to(x0)
        fresh = fresh + delta * m1 / (window_norm + 1e-10)
        budget = ((self.eps ** 2 - total_sq).clamp_min(0.0) / c)[:, None, None, None] + union_norm ** 2
        fresh = fresh / fresh.flatten(2).norm(dim=2)[..., None, None].clamp_min(1e-12) * budget.sqrt()
        delta = torch.where(win.mask, fresh, torch.where(other.mask, torch.zeros_like(delta), delta))
        delta = delta * expand(self.eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12), delta)
        return (x0 + delta).clamp(0.0, 1.0)
