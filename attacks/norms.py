"""All norm-specific maths in one place: measuring, projecting, random starts and steepest-ascent directions.

Every attack that is bounded by an Lp ball goes through a :class:`Norm` object, so adding a norm means adding one
class here, not an ``if norm == ...`` chain in every attack. Budgets are in [0, 1] pixel units. ``eps`` may be a
float or a per-sample tensor of shape ``(N,)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attacks.rng import SampleRNG

_TINY = 1e-12


def _per_sample(eps: float | Tensor, like: Tensor) -> Tensor | float:
    """Reshape a per-sample ``(N,)`` budget so it broadcasts against ``like`` of shape ``(N, ...)``."""
    if isinstance(eps, Tensor):
        return eps.to(like).reshape(-1, *([1] * (like.dim() - 1)))
    return eps


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

    def __repr__(self) -> str:
        return f"Norm({self.name!r})"


class Linf(Norm):
    name = "linf"

    def measure(self, delta: Tensor) -> Tensor:
        return _flat(delta).abs().amax(dim=1)

    def project(self, delta: Tensor, eps: float | Tensor) -> Tensor:
        e = _per_sample(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e) if isinstance(e, Tensor) else delta.clamp(-e, e)

    def random(self, rng: SampleRNG, idx: Tensor, shape: tuple[int, ...], eps: float | Tensor) -> Tensor:
        u = rng.uniform(idx, tuple(shape))
        return (2 * u - 1) * _per_sample(eps, u)

    def steepest(self, grad: Tensor) -> Tensor:
        return grad.sign()


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


class L0(Norm):
    """Number of changed *pixels* (a pixel counts once however many of its channels changed).

    Only measures: sparse attacks build their own feasible sets, so there is no projection or random start.
    """

    name = "l0"

    def measure(self, delta: Tensor) -> Tensor:
        changed = delta.ne(0)
        if delta.dim() == 4:  # (N, C, H, W): a pixel is all channels at one location
            changed = changed.any(dim=1)
        return _flat(changed).sum(dim=1).to(torch.float32)


NORMS: dict[str, Norm] = {n.name: n for n in (Linf(), L2(), L0())}


def get_norm(name: str) -> Norm:
    """Look up a norm by name (``linf``, ``l2``, ``l0``); ``inf``/``Linf``/``2`` are accepted spellings."""
    key = str(name).strip().lower().replace("_", "")
    key = {"inf": "linf", "2": "l2", "0": "l0"}.get(key, key)
    if key not in NORMS:
        raise ValueError(f"unknown norm {name!r}: choose one of {', '.join(NORMS)}")
    return NORMS[key]
