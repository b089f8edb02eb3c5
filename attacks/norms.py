"""All norm-specific maths in one place: measuring, projecting, random starts and steepest-ascent directions.

Every attack that is bounded by an Lp ball goes through a :class:`Norm` object, so adding a norm means adding one
class here, not an ``if norm == ...`` chain in every attack. Budgets are in [0, 1] pixel units. ``eps`` may be a
float or a per-sample tensor of shape ``(N,)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from typing import Optional

from attacks.rng import SampleRNG

_TINY = 1e-12


def per_sample(value: float | Tensor, like: Tensor) -> Tensor | float:
    """Reshape a per-sample ``(N,)`` tensor so it broadcasts against ``like`` of shape ``(N, ...)`` (numbers cast
    to ``like``'s dtype, masks kept boolean, both moved to its device); a plain number is returned as it is."""
    if isinstance(value, Tensor):
        value = value.to(like.device) if value.dtype == torch.bool else value.to(like)
        return value.reshape(-1, *([1] * (like.dim() - 1)))
    return value


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


class Norm:
    """Interface of a norm; the concrete norms below fill it in."""

    name: str = ""

    def measure(self, delta: Tensor) -> Tensor:
        """Size of each sample's perturbation, shape ``(N,)``."""
        raise NotImplementedError

    def project(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        """The closest perturbation inside the ball of radius ``eps`` (per sample)."""
        raise NotImplementedError

    def random(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...], eps: float | Tensor) -> Tensor:
        """Perturbations drawn uniformly from the ball, one per sample at ``idx`` (float32, on ``rng``'s device)."""
        raise NotImplementedError

    def steepest(self, grad: Tensor) -> Tensor:
        """The unit-norm direction that increases a linear function with gradient ``grad`` the most."""
        raise NotImplementedError

    def clip(self, x0: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
        """The point of the ``eps``-ball around ``x0`` closest to ``x`` (projection), then clamped to [0, 1]."""
        return (x0 + self.project(x - x0, eps)).clamp(0.0, 1.0)

    def box(self, x0: Tensor, eps: float | Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Per-element bounds ``(lo, hi)`` of the ball around ``x0`` intersected with [0, 1], when that set is a box
        (Linf); ``None`` otherwise. Computed once per run, it turns projection and clamping into one ``clamp``."""
        return None

    def ascend(self, cur: Tensor, grad: Tensor, alpha: float, x0: Tensor, eps: float | Tensor,
               box: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """One projected steepest-ascent step: ``cur + alpha * steepest(grad)``, projected onto the ``eps``-ball
        around ``x0`` and the [0, 1] box (``box`` is :meth:`box`'s result, or None).

        Works in place where it can: the caller must own ``cur`` and ``grad`` and not use them afterwards.
        """
        stepped = cur + alpha * self.steepest(grad)
        return (x0 + self.project(stepped - x0, eps)).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"Norm({self.name!r})"


class Linf(Norm):
    name = "linf"

    def measure(self, delta: Tensor) -> Tensor:
        return _flat(delta).abs().amax(dim=1)

    def project(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        e = per_sample(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e) if isinstance(e, Tensor) else delta.clamp(-e, e)

    def random(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...], eps: float | Tensor) -> Tensor:
        u = rng.uniform(idx, tuple(shape))
        return (2 * u - 1) * per_sample(eps, u)

    def steepest(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def box(self, x0: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
        e = per_sample(eps, x0)
        return (x0 - e).clamp_(min=0.0), (x0 + e).clamp_(max=1.0)

    def ascend(self, cur, grad, alpha, x0, eps, box=None):
        # sign, step and projection-with-clamping as three in-place passes over the batch (the box is precomputed)
        lo, hi = box if box is not None else self.box(x0, eps)
        direction = grad.sign_() if _owned(grad) else grad.sign()
        if isinstance(alpha, Tensor):
            cur = cur.addcmul_(direction, per_sample(alpha, cur))
        else:
            cur = cur.add_(direction, alpha=alpha)
        return cur.clamp_(lo, hi)


def _owned(t: Tensor) -> bool:
    """Whether ``t`` may be overwritten element by element (no two elements share memory, e.g. not an expand)."""
    return t.is_contiguous()


class L2(Norm):
    name = "l2"

    def measure(self, delta: Tensor) -> Tensor:
        return _flat(delta).norm(p=2, dim=1)

    def project(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        n = self.measure(delta)
        e = eps.to(n) if isinstance(eps, Tensor) else torch.full_like(n, eps)
        factor = torch.where(n > e, e / (n + _TINY), torch.ones_like(n))
        return delta * factor.reshape(-1, *([1] * (delta.dim() - 1)))

    def random(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...], eps: float | Tensor) -> Tensor:
        g = rng.normal(idx, tuple(shape))
        d = math.prod(shape)
        # radius ~ eps * U^(1/d) makes the draw uniform in the ball, not on its shell
        r = rng.uniform(idx, (1,))[:, 0].pow(1.0 / d)
        e = eps.to(r) if isinstance(eps, Tensor) else eps
        unit = g / (_flat(g).norm(dim=1).reshape(-1, *([1] * len(shape))) + _TINY)
        return unit * (r * e).reshape(-1, *([1] * len(shape)))

    def steepest(self, grad: Tensor) -> Tensor:
        n = _flat(grad).norm(dim=1).reshape(-1, *([1] * (grad.dim() - 1)))
        return grad / (n + _TINY)

    def ascend(self, cur, grad, alpha, x0, eps, box=None):
        if not (_owned(grad) and _owned(cur)):
            return super().ascend(cur, grad, alpha, x0, eps, box)
        shape = (-1, *([1] * (grad.dim() - 1)))
        scale = _flat(grad).norm(dim=1).add_(_TINY).reciprocal_()  # alpha / |grad|: the step along grad
        scale = scale * alpha.to(scale) if isinstance(alpha, Tensor) else scale.mul_(alpha)
        delta = cur.addcmul_(grad, scale.reshape(shape)).sub_(x0)  # the step, then relative to x0
        n = _flat(delta).norm(dim=1)
        e = eps.to(n) if isinstance(eps, Tensor) else torch.full_like(n, eps)
        factor = torch.where(n > e, e / (n + _TINY), torch.ones_like(n))
        return delta.mul_(factor.reshape(shape)).add_(x0).clamp_(0.0, 1.0)


class L0(Norm):
    """Number of changed *pixels* (a pixel counts once however many of its channels changed).

    Measures and projects (keep the ``k`` most-changed pixels); sparse attacks build their own feasible sets, so
    there is no random start or steepest direction.
    """

    name = "l0"

    def measure(self, delta: Tensor) -> Tensor:
        changed = delta.ne(0)
        if delta.dim() == 4:  # (N, C, H, W): a pixel is all channels at one location
            changed = changed.any(dim=1)
        return _flat(changed).sum(dim=1).to(torch.float32)

    def project(self, delta: Tensor, eps: int | Tensor) -> Tensor:
        """Keep the ``eps`` pixels with the largest change (summed over channels) and zero the rest.

        ``eps`` is a pixel count (an int or a per-sample ``(N,)`` tensor); a perturbation that already changes at
        most ``eps`` pixels is returned unchanged. Ties are broken by position, so the result is deterministic.
        """
        score = _pixel_scores(delta)
        order = score.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        k = eps.to(rank.device).reshape(-1, 1) if isinstance(eps, Tensor) else eps
        keep = (rank < k) & (score > 0)
        return delta * _pixels_to_delta(keep, delta)


def _pixel_scores(delta: Tensor) -> Tensor:
    """Per-pixel size of a perturbation, ``(N, pixels)``: channel-summed ``|delta|`` for ``(N, C, H, W)`` inputs."""
    a = delta.abs()
    if delta.dim() == 4:
        a = a.sum(dim=1)
    return _flat(a)


def _pixels_to_delta(keep: Tensor, delta: Tensor) -> Tensor:
    """Broadcast a per-pixel ``(N, pixels)`` mask back to ``delta``'s shape (all channels of a pixel alike)."""
    if delta.dim() == 4:
        n, _, h, w = delta.shape
        return keep.reshape(n, 1, h, w).to(delta.dtype)
    return keep.reshape(delta.shape).to(delta.dtype)


# -- patches: a rectangular footprint of a given area ----------------------------------------------------------------
def patch_shape(area: float, height: int, width: int) -> tuple[int, int]:
    """Rows and columns of the largest near-square patch (``a x a`` or ``a x (a+1)``) of at most ``area`` of the image.

    ``area`` is a fraction of the image's ``height * width`` pixels, so the budget is an upper bound: on a 28x28
    image 1 % gives 2x3 pixels (0.77 %), 2 % gives 3x4 (1.53 %), 5 % gives 6x6 (4.59 %), 10 % gives 8x9 (9.18 %).
    """
    if not 0.0 < area < 1.0:
        raise ValueError(f"area must be a fraction of the image in (0, 1), got {area}")
    budget = area * height * width
    a = math.isqrt(int(budget + 1e-9))
    if a < 1:
        raise ValueError(
            f"area {area} of a {height}x{width} image is less than one pixel: use a larger area"
        )
    b = a + 1 if a * (a + 1) <= budget + 1e-9 else a
    return min(a, height), min(b, width)


#: Longest side over shortest side of the patch shapes :func:`patch_shapes` offers: 13x3 at 5 % of a 28x28 image
#: is in (4.3), a 2x19 line is not (9.5).
MAX_ASPECT = 5.0


def patch_shapes(area: float, height: int, width: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """Every rectangle a patch of at most ``area`` of the image can take, with neither side more than ``max_aspect``
    times the other, that lies inside no other such rectangle; ordered by rows.

    On a 28x28 image 5 % (39.2 pixels) gives 3x13, 4x9, 5x7, 6x6, 7x5, 9x4 and 13x3; 2 % (15.7 pixels) gives 2x7,
    3x5, 5x3 and 7x2 (the near-square :func:`patch_shape`, 3x4, is inside 3x5).
    """
    patch_shape(area, height, width)  # the same checks and messages
    budget = area * height * width + 1e-9

    def widest(a: int) -> int:  # the most columns a rows may have (0: none fits)
        b = min(width, int(budget // a), int(max_aspect * a + 1e-9))
        return b if b >= 1 and a <= max_aspect * b + 1e-9 else 0

    cols = [widest(a) for a in range(1, height + 1)]
    return [(a, b) for a, b in enumerate(cols, start=1) if b and all(c < b for c in cols[a:])]


def window_mask(rows: Tensor, cols: Tensor, shape: tuple[int, int], height: int, width: int) -> Tensor:
    """Boolean ``(N, 1, height, width)`` masks of ``shape``-sized windows whose top-left corners are ``(rows, cols)``."""
    a, b = shape
    r = torch.arange(height, device=rows.device)
    c = torch.arange(width, device=cols.device)
    in_r = (r >= rows[:, None]) & (r < rows[:, None] + a)
    in_c = (c >= cols[:, None]) & (c < cols[:, None] + b)
    return (in_r[:, :, None] & in_c[:, None, :])[:, None]


def best_window(weight: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Top-left corners ``(rows, cols)`` of the ``shape`` window with the largest sum of ``weight`` ``(N, 1, H, W)``."""
    rows, cols = ranked_windows(weight, shape, 1)
    return rows[0], cols[0]


def ranked_windows(weight: Tensor, shape: tuple[int, int], count: int) -> tuple[Tensor, Tensor]:
    """Top-left corners ``(rows, cols)``, each ``(count, N)``, of ``count`` non-overlapping ``shape`` windows per
    image, in decreasing order of their sum of ``weight`` ``(N, 1, H, W)`` (greedy non-maximum suppression).

    When fewer than ``count`` disjoint windows fit, the last ones may overlap earlier ones.
    """
    a, b = shape
    sums = torch.nn.functional.avg_pool2d(weight, (a, b), stride=1, divisor_override=1)[:, 0]  # (N, R, C)
    n, r_count, c_count = sums.shape
    rr = torch.arange(r_count, device=weight.device)[None, :, None]
    cc = torch.arange(c_count, device=weight.device)[None, None, :]
    rows, cols = [], []
    for _ in range(count):
        best = sums.reshape(n, -1).argmax(dim=1)
        r, c = best // c_count, best % c_count
        rows.append(r)
        cols.append(c)
        overlap = ((rr - r[:, None, None]).abs() < a) & ((cc - c[:, None, None]).abs() < b)
        sums = sums.masked_fill(overlap, float("-inf"))
    return torch.stack(rows), torch.stack(cols)


class PatchArea(Norm):
    """Fraction of the image's pixels that changed (a pixel counts once however many channels changed).

    For a patch attack this is the area its footprint really covers; :meth:`project_window` keeps only the changes
    inside one rectangular window, which is how patch attacks enforce their footprint.
    """

    name = "area"

    def measure(self, delta: Tensor) -> Tensor:
        pixels = delta[0, 0].numel() if delta.dim() == 4 else delta[0].numel()
        return L0().measure(delta) / pixels

    def project(self, delta: Tensor, eps: float) -> Tensor:
        """Keep the changes inside the best window of the largest patch of area ``eps`` (see :func:`patch_shape`)."""
        return self.project_window(delta, patch_shape(eps, delta.shape[-2], delta.shape[-1]))

    def project_window(self, delta: Tensor, shape: tuple[int, int]) -> Tensor:
        """Zero every change outside the ``shape`` window that holds the most changed pixels (then the most change).

        A perturbation that already fits in one such window is returned unchanged. ``delta`` is ``(N, C, H, W)``.
        """
        _, _, h, w = delta.shape
        a, b = shape
        if a > h or b > w:
            raise ValueError(f"a {a}x{b} patch does not fit in a {h}x{w} image")
        mag = delta.abs().sum(dim=1, keepdim=True)
        # count first, magnitude as a tie-break: every changed pixel weighs more than all magnitudes together
        weight = mag.ne(0).to(mag.dtype) + mag / (mag.sum(dim=(1, 2, 3), keepdim=True) + 1.0)
        rows, cols = best_window(weight, shape)
        return delta * window_mask(rows, cols, shape, h, w).to(delta.dtype)


NORMS: dict[str, Norm] = {n.name: n for n in (Linf(), L2(), L0(), PatchArea())}


def get_norm(name: str) -> Norm:
    """Look up a norm by name (``linf``, ``l2``, ``l0``); ``inf``/``Linf``/``2`` are accepted spellings."""
    key = str(name).strip().lower().replace("_", "")
    key = {"inf": "linf", "2": "l2", "0": "l0"}.get(key, key)
    if key not in NORMS:
        raise ValueError(f"unknown norm {name!r}: choose one of {', '.join(NORMS)}")
    return NORMS[key]
