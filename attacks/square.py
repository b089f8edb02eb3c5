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
_RESAMPLES = 10  # Linf: sign proposals per image and iteration (the first that changes the window is taken)


def p_schedule(p_init: float, it: int, budget: int) -> float:
    """Fraction of the image the window covers at iteration ``it`` of a ``budget``-query run."""
    t = int(it / budget * 10000)
    for end, divisor in _SCHEDULE:
        if t <= end:
            return p_init / divisor
    return p_init / 512


def rademacher(rng: SampleRNG, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Independent +-1 entries of shape ``(len(idx), *shape)`` from the streams of the samples at ``idx``."""
    return signs_of(rng.uniform(idx, shape))


def signs_of(u: Tensor) -> Tensor:
    """+-1 (float32) from uniform numbers in [0, 1): -1 below one half."""
    return (u < 0.5).to(torch.float32) * 2 - 1


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
    """One random ``s x s`` window per image, its top-left corner uniform over the valid positions, picked by the
    uniform numbers ``u_rows, u_cols`` (one per image, in [0, 1))."""

    def __init__(self, u_rows: Tensor, u_cols: Tensor, s: int, h: int, w: int):
        self.s, self.h, self.w = s, h, w
        self.top = (u_rows * (h - s + 1)).long().clamp_(max=h - s)
        self.left = (u_cols * (w - s + 1)).long().clamp_(max=w - s)

    @property
    def mask(self) -> Tensor:
        """Boolean ``(n, 1, h, w)``: where each image's window lies."""
        rows = torch.arange(self.h, device=self.top.device)[None, :] - self.top[:, None]
        cols = torch.arange(self.w, device=self.left.device)[None, :] - self.left[:, None]
        in_rows, in_cols = (rows >= 0) & (rows < self.s), (cols >= 0) & (cols < self.s)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

    @property
    def flat(self) -> Tensor:
        """``(n, s * s)`` flat pixel positions (``row * w + col``) of each image's window, row-major."""
        span = torch.arange(self.s, device=self.top.device)
        rows, cols = self.top[:, None] + span, self.left[:, None] + span
        return (rows[:, :, None] * self.w + cols[:, None, :]).flatten(1)

    def place(self, pattern: Tensor) -> Tensor:
        """Per-image ``(n, s, s)`` patterns written into their windows of an otherwise zero ``(n, 1, h, w)``."""
        n = pattern.shape[0]
        out = pattern.new_zeros(n, 1, self.h * self.w)
        out.scatter_(2, self.flat[:, None, :], pattern.reshape(n, 1, -1))
        return out.reshape(n, 1, self.h, self.w)


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
        # Every random number of the iteration comes from one draw per image (one call of the per-sample streams,
        # whose fixed cost would otherwise dominate an iteration on the few images left late in a run).
        ids = state["ids"]
        x0 = search.oracle.x
        c, h, w = x0.shape[1:]
        if self.norm == "linf":
            u = search.oracle.rng.uniform(ids, (2 + _RESAMPLES * c,))
            win = _Windows(u[:, 0], u[:, 1], self._side(it, h, w), h, w)
            cand = self._linf_candidate(u[:, 2:].reshape(-1, _RESAMPLES, c) < 0.5, state["x"], state["up"],
                                        state["down"], win)
        else:
            u = search.oracle.rng.uniform(ids, (5 + c,))
            win = _Windows(u[:, 0], u[:, 1], self._side(it, h, w), h, w)
            cand = self._l2_candidate(u[:, 2:], state["x"], x0[ids], win)
        search.accept(state, cand)
        return state

    @staticmethod
    def _linf_candidate(signs: Tensor, cur: Tensor, up: Tensor, down: Tensor, win: _Windows) -> Tensor:
        """Set each image's window to ``x0 +- eps`` (``up``/``down``, clamped to [0, 1]; a sign per channel).

        ``signs`` ``(n, R, c)`` are ``R`` independent sign proposals per image; the first one that changes the
        window is taken (the last when none does): rejection sampling on the signs alone, vectorized, since which
        sign moves which channel is known without a query. Only the windows' pixels are read and written."""
        n, c = cur.shape[:2]
        where = win.flat[:, None, :].expand(n, c, -1)  # (n, c, s*s)
        up_w, down_w = up.flatten(2).gather(2, where), down.flatten(2).gather(2, where)
        cur_w = cur.flatten(2).gather(2, where)
        moves_up = ((up_w - cur_w).abs() > 1e-7).any(dim=2)  # (n, c)
        moves_down = ((down_w - cur_w).abs() > 1e-7).any(dim=2)
        moves = torch.where(signs, moves_up[:, None, :], moves_down[:, None, :]).any(dim=2)  # (n, R)
        moves[:, -1] = True
        first = moves.to(torch.uint8).argmax(dim=1)
        chosen = signs[torch.arange(n, device=signs.device), first]  # (n, c)
        cand = cur.clone(memory_format=torch.contiguous_format)  # contiguous: flatten(2) below is a view
        cand.flatten(2).scatter_(2, where, torch.where(chosen[:, :, None], up_w, down_w))
        return cand

    def _l2_candidate(self, u: Tensor, cur: Tensor, x0: Tensor, win: _Windows) -> Tensor:
        """Move the mass of a second window into the first, add a fresh bump there, and rescale to norm ``eps``.

        ``u`` ``(n, 3 + c)``: uniform numbers for the second window's corner, the bump's orientation and its sign
        per channel."""
        c, h, w = x0.shape[1:]
        in_win, in_other = win.mask, _Windows(u[:, 0], u[:, 1], win.s, h, w).mask
        delta = cur - x0
        m1, both = in_win.to(x0), (in_win | in_other).to(x0)
        window_norm = (delta * m1).flatten(2).norm(dim=2)[..., None, None]  # (n, c, 1, 1)
        union_norm = (delta * both).flatten(2).norm(dim=2)[..., None, None]
        total_sq = delta.flatten(1).pow(2).sum(dim=1)
        bump = _twin_bump(win.s).to(x0)
        patterns = torch.where((u[:, 2] < 0.5)[:, None, None], bump.t(), bump)
        fresh = win.place(patterns) * signs_of(u[:, 3:]).to(x0)[:, :, None, None]
        fresh = fresh + delta * m1 / (window_norm + 1e-10)
        budget = ((self.eps ** 2 - total_sq).clamp_min(0.0) / c)[:, None, None, None] + union_norm ** 2
        fresh = fresh / fresh.flatten(2).norm(dim=2)[..., None, None].clamp_min(1e-12) * budget.sqrt()
        delta = torch.where(in_win, fresh, torch.where(in_other, torch.zeros_like(delta), delta))
        delta = delta * expand(self.eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12), delta)
        return (x0 + delta).clamp(0.0, 1.0)
