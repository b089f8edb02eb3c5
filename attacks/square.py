"""Square Attack — score-based random search over square-shaped updates.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial attack via random
search", ECCV 2020. Each iteration changes one random ``s x s`` window of the perturbation and keeps the change if
the margin loss improves (one query per sample per iteration). The window covers a fraction ``p`` of the image, and
``p`` follows the paper's piecewise-constant schedule from ``p_init`` (halved at 10, 50, 200, 500, 1000, 2000,
4000, 6000 and 8000 of 10,000 queries, rescaled to ``max_queries``).

* Linf (:class:`Stripes`): start from vertical stripes of +-eps; a window is set to +-eps (a random sign per
  channel), at a vertex of the ball.
* L2 (:class:`Bumps`): start from a grid of pseudo-Gaussian bumps scaled to norm eps; a window receives a new bump
  plus its old content while the mass of a second window moves into it, then the whole perturbation is rescaled to
  norm eps.

Defaults: margin loss and the schedule as in the paper; ``p_init = 0.8``, the authors' own setting in AutoAttack
for every dataset (the paper's 0.05 Linf / 0.1 L2 are for 224 x 224 ImageNet images: on 28 x 28 images they
shrink the window to a single pixel within 100 of 1000 queries; on Fashion-MNIST at Linf 0.1, 0.8 fools 2 points
more images with half the median queries). Unlike the reference code, every image draws its own window position.

>>> Square(eps=0.1, max_queries=1000)(model, x, y).queries.float().median()
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from attacks.base import check_range
from attacks.blackbox import ScoreAttack, ScoreSearch
from attacks.norms import L2, Linf
from attacks.params import param
from attacks.registry import register
from attacks.rng import SampleRNG
from attacks.workset import WorkSet

#: (end of the phase in queries out of 10,000, divisor of p_init) — the paper's schedule.
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))
_RESAMPLES = 10  # Linf: sign proposals per image and iteration (the first that changes the window is taken)
_BLOCK = 16  # iterations whose random numbers an image draws at once (one call of its stream per block)


def p_schedule(p_init: float, it: int, budget: int) -> float:
    """Fraction of the image the window covers at iteration ``it`` of a ``budget``-query run."""
    t = int(it / budget * 10000)
    for end, divisor in _SCHEDULE:
        if t <= end:
            return p_init / divisor
    return p_init / 512


@functools.lru_cache(maxsize=16)
def _side_table(attack: "Square", h: int, w: int) -> Tensor:
    """Window side at every iteration ``0 .. max_queries`` of ``attack`` on ``h x w`` images."""
    return torch.tensor([attack._side(it, h, w) for it in range(attack.max_queries + 1)])


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


@functools.lru_cache(maxsize=8)
def _twin_bump_table(m: int) -> Tensor:
    """``(m + 1, m, m)``: slice ``s`` holds :func:`_twin_bump` ``(s)`` in its top-left corner, zeros elsewhere."""
    out = torch.zeros(m + 1, m, m)
    for s in range(1, m + 1):
        out[s, :s, :s] = _twin_bump(s)
    return out


class _Windows:
    """One random ``s x s`` window per image (``s``: a side per image, since each image follows the schedule at its
    own iteration), its top-left corner uniform over the valid positions, picked by the uniform numbers
    ``u_rows, u_cols`` (one per image, in [0, 1))."""

    def __init__(self, u_rows: Tensor, u_cols: Tensor, s: Tensor, h: int, w: int):
        self.s, self.h, self.w = s, h, w
        self.top = torch.minimum((u_rows * (h - s + 1)).long(), h - s)
        self.left = torch.minimum((u_cols * (w - s + 1)).long(), w - s)

    @functools.cached_property
    def _offsets(self) -> tuple[Tensor, Tensor]:
        """``(n, h)`` and ``(n, w)``: each pixel row's and column's position relative to the window's corner."""
        rows = torch.arange(self.h, device=self.top.device)[None, :] - self.top[:, None]
        return rows, torch.arange(self.w, device=self.left.device)[None, :] - self.left[:, None]

    @functools.cached_property
    def mask(self) -> Tensor:
        """Boolean ``(n, 1, h, w)``: where each image's window lies (built once; L2 reads it twice)."""
        rows, cols = self._offsets
        side = self.s[:, None]
        in_rows, in_cols = (rows >= 0) & (rows < side), (cols >= 0) & (cols < side)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

    @property
    def flat(self) -> Tensor:
        """``(n, S * S)`` flat pixel positions (``row * w + col``) of each image's window, row-major, ``S`` the
        largest side; a smaller window repeats its last row and column (duplicates, harmless to gather and to
        scatter the same values)."""
        span = torch.arange(int(self.s.max()), device=self.top.device)[None, :]
        span = torch.minimum(span, self.s[:, None] - 1)
        rows, cols = self.top[:, None] + span, self.left[:, None] + span
        return (rows[:, :, None] * self.w + cols[:, None, :]).flatten(1)

    def paint(self, transpose: Tensor) -> Tensor:
        """``(n, 1, h, w)``: each image's :func:`_twin_bump` of its side (transposed where ``transpose``) in its
        window, zeros elsewhere."""
        table = _twin_bump_table(min(self.h, self.w)).to(self.top.device)
        last = table.shape[1] - 1
        rows, cols = self._offsets
        rows = rows.clamp(0, last)[:, :, None].expand(-1, -1, self.w)
        cols = cols.clamp(0, last)[:, None, :].expand(-1, self.h, -1)
        flip = transpose[:, None, None]
        values = table[self.s[:, None, None], torch.where(flip, cols, rows), torch.where(flip, rows, cols)]
        return torch.where(self.mask, values[:, None], 0.0)


class Stripes:
    """Square under Linf: start from vertical stripes of +-eps; a window is set to +-eps (a random sign per
    channel), at a vertex of the ball."""

    @staticmethod
    def side(s: int) -> int:
        return s

    @staticmethod
    def draws(c: int) -> int:
        """Uniform numbers per image and iteration: the window's corner and ``_RESAMPLES`` sign proposals per
        channel."""
        return 2 + _RESAMPLES * c

    @staticmethod
    def start(attack: "Square", search: ScoreSearch, ids: Tensor, x0: Tensor) -> WorkSet:
        # the two values a pixel can take, computed once: the ball's faces clamped to [0, 1]. Every point of the
        # search copies its pixels from them, so a pixel's side is known by exact comparison.
        c, _, w = x0.shape[1:]
        up, down = (x0 + attack.eps).clamp(max=1.0), (x0 - attack.eps).clamp(min=0.0)
        stripes = rademacher(search.oracle.rng, ids, (c, 1, w)).to(x0) > 0
        return search.start(torch.where(stripes, up, down), ids, up=up, down=down)

    @staticmethod
    def candidate(attack: "Square", search: ScoreSearch, work: WorkSet, u: Tensor, win: _Windows) -> Tensor:
        """Set each image's window to ``x0 +- eps`` (``up``/``down``, clamped to [0, 1]; a sign per channel).

        ``u[:, 2:]`` holds ``R`` independent sign proposals per image and channel; the first one that changes the
        window is taken (the last when none does): rejection sampling on the signs alone, vectorized, since which
        sign moves which channel is known without a query. Only the windows' pixels are read and written."""
        cur, up, down = work.x, work.up, work.down
        n, c = cur.shape[:2]
        signs = u[:, 2:].reshape(-1, _RESAMPLES, c) < 0.5  # (n, R, c)
        where = win.flat[:, None, :].expand(n, c, -1)  # (n, c, s*s)
        up_w, down_w = up.flatten(2).gather(2, where), down.flatten(2).gather(2, where)
        at_up = cur.flatten(2).gather(2, where) == up_w  # every pixel is a copy of `up` or of `down` (!= up)
        moves_up, moves_down = (~at_up).any(dim=2), at_up.any(dim=2)  # (n, c)
        moves = torch.where(signs, moves_up[:, None, :], moves_down[:, None, :]).any(dim=2)  # (n, R)
        moves[:, -1] = True
        first = moves.to(torch.uint8).argmax(dim=1)
        chosen = signs[torch.arange(n, device=signs.device), first]  # (n, c)
        cand = cur.clone(memory_format=torch.contiguous_format)  # contiguous: flatten(2) below is a view
        cand.flatten(2).scatter_(2, where, torch.where(chosen[:, :, None], up_w, down_w))
        return cand


class Bumps:
    """Square under L2: start from a grid of pseudo-Gaussian bumps scaled to norm eps; a window receives a new bump
    plus its old content while the mass of a second window moves into it, then the whole perturbation is rescaled
    to norm eps."""

    norm = L2()

    @staticmethod
    def side(s: int) -> int:
        """Odd and at least 3: room for two half-bumps and a centre."""
        return max(s, 3) + (max(s, 3) + 1) % 2

    @staticmethod
    def draws(c: int) -> int:
        """Uniform numbers per image and iteration: the window's corner, the second window's corner, the bump's
        orientation and a sign per channel."""
        return 5 + c

    def start(self, attack: "Square", search: ScoreSearch, ids: Tensor, x0: Tensor) -> WorkSet:
        delta = self.grid(search.oracle.rng, ids, *x0.shape[1:]).to(x0)
        return search.start((x0 + self.norm.rescale(delta, attack.eps)).clamp(0.0, 1.0), ids)

    @staticmethod
    def grid(rng: SampleRNG, ids: Tensor, c: int, h: int, w: int) -> Tensor:
        """A grid of ``h // 5``-sized twin bumps, each with a random sign per image and channel."""
        t = max(min(h, w) // 5, 1)
        nh, nw = h // t, w // t
        signs = rademacher(rng, ids, (c, nh, nw)).cpu()
        tiles = signs.repeat_interleave(t, dim=2).repeat_interleave(t, dim=3) * _twin_bump(t).repeat(nh, nw)
        out = torch.zeros(len(ids), c, h, w)
        top, left = (h - t * nh) // 2, (w - t * nw) // 2
        out[:, :, top:top + t * nh, left:left + t * nw] = tiles
        return out

    def candidate(self, attack: "Square", search: ScoreSearch, work: WorkSet, u: Tensor, win: _Windows) -> Tensor:
        """Move the mass of a second window into the first, add a fresh bump there, and rescale to norm ``eps``.

        ``u[:, 2:]``: uniform numbers for the second window's corner, the bump's orientation and its sign per
        channel."""
        u = u[:, 2:]
        cur, x0 = work.x, search.oracle.x[work.ids]
        c, h, w = x0.shape[1:]
        in_win, in_other = win.mask, _Windows(u[:, 0], u[:, 1], win.s, h, w).mask
        delta = cur - x0
        m1, both = in_win.to(x0), (in_win | in_other).to(x0)
        window_norm = (delta * m1).flatten(2).norm(dim=2)[..., None, None]  # (n, c, 1, 1)
        union_norm = (delta * both).flatten(2).norm(dim=2)[..., None, None]
        total_sq = delta.flatten(1).pow(2).sum(dim=1)
        fresh = win.paint(u[:, 2] < 0.5).to(x0) * signs_of(u[:, 3:]).to(x0)[:, :, None, None]
        fresh = fresh + delta * m1 / (window_norm + 1e-10)
        budget = ((attack.eps ** 2 - total_sq).clamp_min(0.0) / c)[:, None, None, None] + union_norm ** 2
        fresh = fresh / fresh.flatten(2).norm(dim=2)[..., None, None].clamp_min(1e-12) * budget.sqrt()
        delta = torch.where(in_win, fresh, torch.where(in_other, torch.zeros_like(delta), delta))
        return (x0 + self.norm.rescale(delta, attack.eps)).clamp(0.0, 1.0)


#: How Square searches under each norm.
MOVES = {Linf: Stripes(), L2: Bumps()}


@register
@dataclass(frozen=True, kw_only=True)
class Square(ScoreAttack):
    name = "square"
    description = "Square Attack: random search over square windows, scores only (Andriushchenko et al. 2020)"

    p_init: float = param(0.8, "Fraction of the image the square window covers at the start (then halved on "
                               "the paper's schedule).")

    def _validate(self) -> None:
        super()._validate()
        check_range("p_init", self.p_init, low=0.0, high=1.0)

    @property
    def moves(self) -> Stripes | Bumps:
        """The norm's start, candidates and window sides (:data:`MOVES`)."""
        return MOVES[type(self.norm_obj)]

    def _side(self, it: int, h: int, w: int) -> int:
        s = self.moves.side(round((p_schedule(self.p_init, it, self.max_queries) * h * w) ** 0.5))
        return max(1, min(s, min(h, w) - 1))

    def _sides(self, it: Tensor, h: int, w: int) -> Tensor:
        """:meth:`_side` of each sample's own iteration ``it``, looked up in a table of the whole budget."""
        table = _side_table(self, h, w).to(it.device)
        return table[it.clamp(max=table.numel() - 1)]

    def _start(self, search: ScoreSearch, ids: Tensor) -> WorkSet:
        x0 = search.oracle.x[ids]
        work = self.moves.start(self, search, ids, x0)
        work.draws = x0.new_empty(len(ids), _BLOCK, self.moves.draws(x0.shape[1]))
        return work

    @staticmethod
    def _uniforms(search: ScoreSearch, work: WorkSet) -> Tensor:
        """This iteration's uniform numbers per image, ``(n, k)``. Each image draws them ``_BLOCK`` iterations at a
        time from its own stream (one call of the per-sample streams, whose fixed cost would otherwise dominate an
        iteration on the few images left late in a run), so they depend on nothing but the image and its
        iteration."""
        draws, slot = work.draws, work.it % _BLOCK
        fresh = slot == 0
        if bool(fresh.any()):
            pos = fresh.nonzero()[:, 0]
            draws[pos] = search.oracle.rng.uniform(work.ids[pos], draws.shape[1:]).to(draws)
        return draws.gather(1, slot[:, None, None].expand(-1, 1, draws.shape[2]))[:, 0]

    def _step(self, search: ScoreSearch, work: WorkSet) -> None:
        h, w = search.oracle.x.shape[2:]
        u = self._uniforms(search, work)
        win = _Windows(u[:, 0], u[:, 1], self._sides(work.it, h, w), h, w)
        search.accept(work, self.moves.candidate(self, search, work, u, win))
