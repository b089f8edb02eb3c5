"""Randomized smoothing (Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``, is robust within the L2 ball
of radius ``sigma * Phi^-1(pA)`` around ``x`` when the top class has probability ``pA``. :class:`Smoothed` estimates
it by Monte Carlo: :meth:`Smoothed.predict` (the paper's PREDICT, abstaining when the two top classes cannot be told
apart) and :meth:`Smoothed.certify` (CERTIFY: a lower confidence bound on ``pA`` from the one-sided Clopper-Pearson
interval, and the radius it proves). Both hold with probability at least ``1 - alpha`` over the noise.

The statistics come from SciPy: the exact binomial test and the beta quantile of the Clopper-Pearson bound.
Noisy copies are not clamped to [0, 1], as in the paper; a model is trained for this with Gaussian noise of the
same ``sigma`` (``TrainConfig.noise_sigma``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

#: What :meth:`Smoothed.predict` and :meth:`Smoothed.certify` return instead of a class when they abstain.
ABSTAIN = -1


class Certificate(NamedTuple):
    """The result of :meth:`Smoothed.certify` for one image: the class (or :data:`ABSTAIN`), the certified L2 radius
    (0 when abstaining), the lower confidence bound on the top class's probability, and the noise samples used."""

    prediction: int
    radius: float
    p_lower: float
    samples: int


def _stats():
    """``scipy.stats``, imported on first use (it takes a while to import, and training never needs it)."""
    from scipy import stats

    return stats


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """The one-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion (0 when no successes)."""
    if successes <= 0:
        return 0.0
    return float(_stats().beta.ppf(alpha, successes, trials - successes + 1))


def radius(sigma: float, p_lower: float) -> float:
    """The certified L2 radius ``sigma * Phi^-1(p_lower)`` (0 when ``p_lower <= 1/2``: nothing is certified)."""
    return float(sigma * _stats().norm.ppf(p_lower)) if p_lower > 0.5 else 0.0


class Smoothed:
    """The Gaussian-smoothed version of ``model`` (logits for images in [0, 1]) with noise level ``sigma``.

    Noise is drawn from ``generator`` (on its device; the global RNG when None) in batches of ``batch_size`` noisy
    copies, so the same seed and batch size give the same counts. The model runs in eval mode under
    ``torch.inference_mode()``; its modules' training flags are restored afterwards.
    """

    def __init__(self, model: nn.Module, sigma: float, num_classes: int) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.model, self.sigma, self.num_classes = model, float(sigma), num_classes

    def counts(self, x: torch.Tensor, num: int, batch_size: int = 1000,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """How often the base model predicts each class on ``num`` noisy copies of one image ``x`` (C, H, W):
        int64 (num_classes,) on the CPU."""
        _check_count("the number of samples", num)
        _check_count("batch_size", batch_size)
        if x.dim() != 3:
            raise ValueError(f"x must be one image of shape (C, H, W), got shape {tuple(x.shape)}")
        where = generator.device if generator is not None else x.device
        totals = torch.zeros(self.num_classes, dtype=torch.int64, device=x.device)
        flags = [m.training for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.inference_mode():
                for first in range(0, num, batch_size):
                    size = min(batch_size, num - first)
                    noise = torch.randn((size, *x.shape), generator=generator, device=where, dtype=x.dtype)
                    logits = self.model(x.unsqueeze(0) + self.sigma * noise.to(x.device))
                    if logits.shape[-1] != self.num_classes:
                        raise ValueError(f"the model returns {logits.shape[-1]} logits, not num_classes "
                                         f"{self.num_classes}")
                    totals += torch.bincount(logits.argmax(1), minlength=self.num_classes)
        finally:
            for m, f in zip(self.model.modules(), flags):
                m.training = f
        return totals.cpu()

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = 1000,
                generator: torch.Generator | None = None) -> int:
        """PREDICT: the smoothed class of one image, or :data:`ABSTAIN` when a two-sided binomial test of the top
        two counts out of ``n`` samples cannot reject equal probabilities at level ``alpha``. A returned class
        differs from ``g(x)`` with probability at most ``alpha``."""
        alpha = _check_alpha(alpha)
        counts = self.counts(x, n, batch_size, generator)
        top = torch.topk(counts, 2)
        first, second = int(top.values[0]), int(top.values[1])
        if _stats().binomtest(first, first + second, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top.indices[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 1000,
                generator: torch.Generator | None = None) -> Certificate:
        """CERTIFY: pick the top class from ``n0`` samples, bound its probability from below with ``n`` fresh
        samples (one-sided Clopper-Pearson at level ``alpha``) and return the L2 radius it proves, or
        :data:`ABSTAIN` (radius 0) when the bound is not above 1/2. With probability at least ``1 - alpha`` a
        returned class is ``g``'s at every point within the radius."""
        alpha = _check_alpha(alpha)
        _check_count("n0", n0)
        guess = int(self.counts(x, n0, batch_size, generator).argmax())
        hits = int(self.counts(x, n, batch_size, generator)[guess])
        p_lower = lower_confidence_bound(hits, n, alpha)
        if p_lower <= 0.5:
            return Certificate(ABSTAIN, 0.0, p_lower, n0 + n)
        return Certificate(guess, radius(self.sigma, p_lower), p_lower, n0 + n)


def add_gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + N(0, sigma^2)`` per pixel, not clamped (the training augmentation that randomized smoothing needs), in
    ``x``'s memory layout; the noise comes from ``generator`` (on ``x``'s device; the global RNG when None)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    return (x + sigma * noise).contiguous(memory_format=layout)
