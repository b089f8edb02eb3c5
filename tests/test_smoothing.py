"""Randomized smoothing: the certified radius against the closed form on a classifier whose class probabilities
under noise are known, abstention, determinism under a seed, and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from robustcnn.certify import ABSTAIN, Smoothed, add_gaussian_noise


class Threshold(nn.Module):
    """Class 0 iff the first pixel is below ``t``: at x = 0 under N(0, sigma^2) noise, P(class 0) = Phi(t / sigma)."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        return torch.stack([self.t - v, v - self.t], dim=1)


SIGMA = 0.5
X0 = torch.zeros(1, 2, 2)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_certify_matches_the_closed_form():
    t = 0.4
    p_true = stats.norm.cdf(t / SIGMA)
    smoothed = Smoothed(Threshold(t), SIGMA, 2)
    cert = smoothed.certify(X0, n0=100, n=2000, alpha=0.001, batch_size=500, generator=_gen())
    assert cert.prediction == 0 and cert.samples == 2100
    assert cert.p_lower <= p_true
    assert cert.radius == pytest.approx(SIGMA * stats.norm.ppf(cert.p_lower), rel=1e-12)
    assert 0 < cert.radius < t
    # the bound is the one-sided Clopper-Pearson one on the estimation counts (drawn after the n0 selection draws)
    g = _gen()
    smoothed.counts(X0, 100, 500, g)
    hits = int(smoothed.counts(X0, 2000, 500, g)[0])
    assert cert.p_lower == pytest.approx(stats.beta.ppf(0.001, hits, 2000 - hits + 1), rel=1e-12)


def test_with_many_samples_the_radius_approaches_sigma_phi_inverse_pa():
    t = 0.3
    smoothed = Smoothed(Threshold(t), SIGMA, 2)
    cert = smoothed.certify(X0, n0=100, n=400_000, alpha=0.001, batch_size=100_000, generator=_gen(1))
    assert cert.radius <= t  # sigma * Phi^-1(Phi(t / sigma)) = t, and the bound is below pA
    assert cert.radius == pytest.approx(t, abs=0.01)


def test_predict_abstains_on_a_coin_flip_and_answers_a_clear_case():
    coin = Smoothed(Threshold(0.0), SIGMA, 2)  # P(class 0) = 1/2
    assert coin.predict(X0, n=1000, alpha=0.001, generator=_gen()) == ABSTAIN
    assert coin.certify(X0, n0=100, n=1000, alpha=0.001, generator=_gen()).prediction == ABSTAIN
    clear = Smoothed(Threshold(-1.0), SIGMA, 2)  # P(class 0) = Phi(-2): class 1 almost always
    assert clear.predict(X0, n=1000, alpha=0.001, generator=_gen()) == 1


def test_same_seed_same_result_other_seed_other_counts():
    smoothed = Smoothed(Threshold(0.2), SIGMA, 2)
    runs = [smoothed.certify(X0, 50, 3000, 0.01, batch_size=700, generator=_gen(s)) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0].p_lower != runs[2].p_lower


def test_counts_sum_to_the_samples_and_the_model_is_left_as_it_was():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    counts = Smoothed(model, 0.25, 3).counts(X0, 1234, batch_size=100, generator=_gen())
    assert counts.sum() == 1234 and counts.shape == (3,)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("call, message", [
    (lambda: Smoothed(Threshold(0), 0.0, 2), "sigma"),
    (lambda: Smoothed(Threshold(0), -1.0, 2), "sigma"),
    (lambda: Smoothed(Threshold(0), math.nan, 2), "sigma"),
    (lambda: Smoothed(Threshold(0), 0.5, 1), "num_classes"),
    (lambda: Smoothed(Threshold(0), 0.5, 2).certify(X0, 10, 0, 0.01), "samples"),
    (lambda: Smoothed(Threshold(0), 0.5, 2).certify(X0, 0, 10, 0.01), "n0"),
    (lambda: Smoothed(Threshold(0), 0.5, 2).certify(X0, 10, 10, 1.0), "alpha"),
    (lambda: Smoothed(Threshold(0), 0.5, 2).predict(X0, 10, 0.0), "alpha"),
    (lambda: Smoothed(Threshold(0), 0.5, 2).predict(X0.unsqueeze(0), 10, 0.01), "one image"),
    (lambda: Smoothed(Threshold(0), 0.5, 3).predict(X0, 10, 0.01), "logits"),
])
def test_bad_input_is_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_gaussian_noise_is_unclamped_and_seeded():
    x = torch.full((64, 1, 8, 8), 0.5)
    a, b = add_gaussian_noise(x, 0.25, _gen(3)), add_gaussian_noise(x, 0.25, _gen(3))
    assert torch.equal(a, b)
    assert a.min() < 0 and a.max() > 1
    assert (a - x).std().item() == pytest.approx(0.25, rel=0.05)


def test_each_image_has_its_own_stream_and_certified_accuracy_counts_correct_and_certified():
    from robustcnn.certify import certified_accuracy, smooth_certify

    images = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.3)])
    model = Threshold(0.2)
    both = smooth_certify(model, images, torch.tensor([0, 1]), sigma=SIGMA, num_classes=2, n0=20, samples=500,
                          alpha=0.01, seed=4)
    alone = smooth_certify(model, images[:1], torch.tensor([0]), sigma=SIGMA, num_classes=2, n0=20, samples=500,
                           alpha=0.01, seed=4)
    assert both[0] == alone[0]
    rows = [{"correct": True, "radius": 0.3}, {"correct": True, "radius": 0.0}, {"correct": False, "radius": 0.9},
            {"correct": False, "radius": 0.0}]
    assert certified_accuracy(rows, [0.0, 0.25, 0.5]) == [0.5, 0.25, 0.0]
