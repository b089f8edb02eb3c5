"""All norm-specific maths in one place: measuring, projecting, normalising, random starts, steepest-ascent
directions, the dual norm and the budgets each norm allows.

Every attack that is bounded by an Lp ball goes through a :class:`Norm` object, so adding a norm means adding one
class here, not an ``if norm == ...`` chain in every attack. Budgets are in [0, 1] pixel units. ``eps`` may be a
float or a per-sample tensor of shape ``(N,)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from attacks.geometry import best_window, patch_shape, window_mask
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
    """``(n, rest)``: one row per sample, also for no samples (``reshape(0, -1)`` is ambiguous)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")


class Norm:
    """Interface of a norm; the concrete norms below fill it in.

    ``p`` is the exponent of an Lp norm (``math.inf`` for Linf); :attr:`dual` is the norm that measures gradients
    (the distance to a hyperplane ``<w, x> = b`` is ``|<w, x> - b| / dual.measure(w)``).
    """

    name: str = ""
    p: float = math.nan

    def measure(self, delta: Tensor) -> Tensor:
        """Size of each sample's perturbation, shape ``(N,)``."""
        raise NotImplementedError(f"the {self.name} norm cannot measure")

    def project(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        """The closest perturbation inside the ball of radius ``eps`` (per sample)."""
        raise NotImplementedError(f"the {self.name} norm has no projection")

    def random(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...], eps: float | Tensor) -> Tensor:
        """Perturbations drawn uniformly from the ball, one per sample at ``idx`` (float32, on ``rng``'s device)."""
        raise NotImplementedError(f"the {self.name} norm has no random draws")

    def steepest(self, grad: Tensor) -> Tensor:
        """The unit-norm direction that increases a linear function with gradient ``grad`` the most."""
        raise NotImplementedError(f"the {self.name} norm has no steepest direction")

    @property
    def dual(self) -> "Norm":
        """The dual norm: ``max <g, d>`` over unit ``d`` in this norm is ``dual.measure(g)``."""
        raise ValueError(f"the {self.name} norm has no dual norm")

    def normalize(self, v: Tensor) -> Tensor:
        """Each sample divided by its size, so it measures 1 (a zero sample stays zero)."""
        return v / per_sample(self.measure(v).clamp_min(_TINY), v)

    def rescale(self, v: Tensor, size: float | Tensor) -> Tensor:
        """Each sample multiplied so it measures ``size`` (a number or per sample; a zero sample stays zero)."""
        return v * per_sample(size / self.measure(v).clamp_min(_TINY), v)

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
        return self.clip(x0, cur + alpha * self.steepest(grad), eps)

    def check_budget(self, eps, shape: Optional[tuple[int, ...]] = None, *, positive: bool = False,
                     name: str = "eps") -> None:
        """Raise a one-line ``ValueError`` unless ``eps`` is a budget of this norm: a number >= 0 (> 0 when
        ``positive``) and no larger than the largest the norm allows on images of ``shape`` ``(C, H, W)`` (when
        ``shape`` is None only the bounds that hold for every image are checked)."""
        _check_number(name, eps)
        if positive and eps <= 0:
            raise ValueError(f"{name} must be > 0, got {eps}")
        if eps < 0:
            raise ValueError(f"{name} must be >= 0, got {eps}")
        limit = self.largest_budget(shape)
        if limit is not None and eps > limit[0]:
            raise ValueError(f"{name} must be <= {limit[0]:g} ({limit[1]}), got {eps}")

    def largest_budget(self, shape: Optional[tuple[int, ...]]) -> Optional[tuple[float, str]]:
        """The largest budget on images of ``shape`` (None: not known) and why, or None when there is no bound."""
        return None

    def __repr__(self) -> str:
        return f"Norm({self.name!r})"


class Linf(Norm):
    name = "linf"
    p = math.inf

    @property
    def dual(self) -> Norm:
        return L1_NORM

    def largest_budget(self, shape):
        return 1.0, "Linf budgets are in [0, 1] pixel units"

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
    p = 2.0

    @property
    def dual(self) -> Norm:
        return self

    def largest_budget(self, shape):
        if shape is None:
            return None
        return math.sqrt(math.prod(shape)), f"the L2 diameter of a {'x'.join(map(str, shape))} image, sqrt(C*H*W)"

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


class L1(Norm):
    """Sum of absolute changes. The dual of Linf (DeepFool measures gradients with it); no attack is bounded by it,
    so it only measures and gives steepest directions."""

    name = "l1"
    p = 1.0

    @property
    def dual(self) -> Norm:
        return NORMS["linf"]

    def measure(self, delta: Tensor) -> Tensor:
        return _flat(delta).norm(p=1, dim=1)

    def steepest(self, grad: Tensor) -> Tensor:
        """All the unit budget on one coordinate of largest ``|grad|`` (the first such), with ``grad``'s sign."""
        flat = _flat(grad)
        out = torch.zeros_like(flat).scatter_(1, flat.abs().argmax(dim=1, keepdim=True), 1.0)
        return (out * flat.sign()).reshape(grad.shape)


class L0(Norm):
    """Number of changed *pixels* (a pixel counts once however many of its channels changed).

    Measures and projects (keep the ``k`` most-changed pixels); sparse attacks build their own feasible sets, so
    there is no random start or steepest direction.
    """

    name = "l0"
    p = 0.0

    def check_budget(self, eps, shape=None, *, positive=False, name="eps"):
        """A whole number of pixels, >= 0 (> 0 when ``positive``), at most the image's ``H * W`` when known."""
        _check_number(name, eps)
        if float(eps) != math.floor(eps):
            raise ValueError(f"{name} must be a whole number of pixels, got {eps}")
        super().check_budget(eps, shape, positive=positive, name=name)

    def largest_budget(self, shape):
        if shape is None:
            return None
        h, w = shape[-2:] if len(shape) >= 2 else (1, shape[0])
        return h * w, f"the pixels of a {h}x{w} image"

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


class PatchArea(Norm):
    """Fraction of the image's pixels that changed (a pixel counts once however many channels changed).

    For a patch attack this is the area its footprint really covers; :meth:`project_window` keeps only the changes
    inside one rectangular window, which is how patch attacks enforce their footprint.
    """

    name = "area"

    def check_budget(self, eps, shape=None, *, positive=True, name="area"):
        """A fraction of the image in (0, 1); with ``shape`` ``(C, H, W)`` known, at least one pixel of it."""
        _check_number(name, eps)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"{name} must be a fraction of the image in (0, 1), got {eps}")
        if shape is not None:
            patch_shape(eps, shape[-2], shape[-1])

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


#: The norms attacks can be bounded by, by name.
NORMS: dict[str, Norm] = {n.name: n for n in (Linf(), L2(), L0(), PatchArea())}
L1_NORM = L1()


def get_norm(name: str) -> Norm:
    """Look up a norm by name (``linf``, ``l2``, ``l0``); ``inf``/``Linf``/``2`` are accepted spellings."""
    key = str(name).strip().lower().replace("_", "")
    key = {"inf": "linf", "2": "l2", "0": "l0"}.get(key, key)
    if key not in NORMS:
        raise ValueError(f"unknown norm {name!r}: choose one of {', '.join(NORMS)}")
    return NORMS[key]
