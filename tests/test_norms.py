"""The Norm interface (attacks.norms): balls, projections, unit vectors, steepest directions, duals and budgets."""

from __future__ import annotations

import math

import pytest
import torch

import attacks
from attacks.norms import L1, L2, NORMS, Linf, get_norm, per_sample
from attacks.rng import SampleRNG

LP = [Linf(), L2()]
SHAPE = (2, 5, 5)
TOL = 1e-5


def _batch(seed: int, n: int = 64, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


def _eps(n: int) -> torch.Tensor:
    return torch.linspace(0.01, 2.0, n)


@pytest.mark.parametrize("norm", LP, ids=lambda n: n.name)
@pytest.mark.parametrize("eps", [0.3, "per-sample"])
def test_project_lands_in_the_ball_and_keeps_points_inside(norm, eps):
    delta = _batch(0, scale=2.0)
    e = _eps(delta.shape[0]) if eps == "per-sample" else eps
    out = norm.project(delta, e)
    bound = e if isinstance(e, torch.Tensor) else torch.full((delta.shape[0],), e)
    assert (norm.measure(out) <= bound * (1 + TOL)).all()
    inside = delta * 1e-3
    assert torch.equal(norm.project(inside, 10.0), inside)  # points of the ball stay where they are


@pytest.mark.parametrize("norm", LP, ids=lambda n: n.name)
def test_clip_lands_in_the_ball_and_the_box(norm):
    x0 = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    x = x0 + _batch(2, scale=0.5)
    eps = _eps(64) * 0.5
    out = norm.clip(x0, x, eps)
    assert out.min() >= 0 and out.max() <= 1
    assert (norm.measure(out - x0) <= eps * (1 + TOL)).all()
    assert torch.equal(out, (x0 + norm.project(x - x0, eps)).clamp(0, 1))


@pytest.mark.parametrize("norm", LP + [L1()], ids=lambda n: n.name)
def test_normalize_and_rescale_give_the_asked_size_and_keep_zero(norm):
    v = _batch(3)
    v[0] = 0
    unit = norm.normalize(v)
    assert torch.allclose(norm.measure(unit[1:]), torch.ones(63), atol=TOL)
    assert torch.equal(unit[0], torch.zeros(SHAPE))
    sizes = _eps(64)
    assert torch.allclose(norm.measure(norm.rescale(v, sizes))[1:], sizes[1:], rtol=TOL)
    assert torch.allclose(norm.measure(norm.rescale(v, 0.25))[1:], torch.full((63,), 0.25), rtol=TOL)


@pytest.mark.parametrize("norm", LP + [L1()], ids=lambda n: n.name)
def test_steepest_is_a_unit_direction_no_random_unit_direction_beats(norm):
    g = _batch(4, n=8)
    d = norm.steepest(g)
    assert torch.allclose(norm.measure(d), torch.ones(8), atol=TOL)
    best = (g * d).flatten(1).sum(dim=1)
    assert torch.allclose(best, norm.dual.measure(g), rtol=TOL)  # <g, d*> is the dual norm of g
    rivals = norm.normalize(torch.randn(8 * 500, *SHAPE, generator=torch.Generator().manual_seed(5)))
    scores = (g.repeat(500, 1, 1, 1) * rivals).flatten(1).sum(dim=1).reshape(500, 8)
    assert (scores <= best * (1 + TOL)).all()


def test_duals():
    assert isinstance(Linf().dual, L1) and isinstance(L1().dual, Linf) and isinstance(L2().dual, L2)
    assert (Linf().p, L2().p, L1().p) == (math.inf, 2.0, 1.0)
    with pytest.raises(ValueError, match="no dual"):
        NORMS["l0"].dual


@pytest.mark.parametrize("norm", LP, ids=lambda n: n.name)
def test_random_draws_are_inside_the_ball_and_seeded(norm):
    idx = torch.arange(200)
    eps = _eps(200)
    draws = norm.random(SampleRNG(idx), idx, SHAPE, eps)
    assert draws.shape == (200, *SHAPE)
    assert (norm.measure(draws) <= eps * (1 + TOL)).all() and (norm.measure(draws) > 0).all()
    assert torch.equal(draws, norm.random(SampleRNG(idx), idx, SHAPE, eps))


def test_per_sample_broadcasts_numbers_and_keeps_masks_boolean():
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    v = per_sample(torch.tensor([1.0, 2.0, 3.0]), like)
    assert v.shape == (3, 1, 1, 1) and v.dtype == torch.float64
    m = per_sample(torch.tensor([True, False, True]), like)
    assert m.shape == (3, 1, 1, 1) and m.dtype == torch.bool
    assert per_sample(0.5, like) == 0.5


# -- budgets ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "norm, eps, shape, message",
    [
        ("linf", 1.5, None, "eps must be <= 1"),
        ("linf", -0.1, None, "eps must be >= 0"),
        ("linf", float("nan"), None, "eps must be a number"),
        ("linf", True, None, "eps must be a number"),
        ("l2", -1.0, None, "eps must be >= 0"),
        ("l2", 28.5, (1, 28, 28), "eps must be <= 28 (the L2 diameter of a 1x28x28 image"),
        ("l2", 4.0, (3, 2, 2), "eps must be <= 3.4641"),
        ("l0", 1.5, None, "whole number of pixels"),
        ("l0", 785, (1, 28, 28), "eps must be <= 784 (the pixels of a 28x28 image)"),
        ("l0", -1, None, "eps must be >= 0"),
        ("area", 1.0, None, "area must be a fraction of the image in (0, 1)"),
        ("area", 0.0, None, "area must be a fraction of the image in (0, 1)"),
        ("area", 0.001, (1, 28, 28), "less than one pixel"),
    ],
)
def test_check_budget_refuses_with_one_line(norm, eps, shape, message):
    with pytest.raises(ValueError, match=r".*") as info:
        get_norm(norm).check_budget(eps, shape)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "norm, eps, shape",
    [("linf", 0.0, None), ("linf", 1.0, (3, 32, 32)), ("l2", 1.5, None), ("l2", 28.0, (1, 28, 28)),
     ("l2", 1e6, None), ("l0", 0, None), ("l0", 784, (1, 28, 28)), ("l0", 3.0, None), ("area", 0.05, (1, 28, 28))],
)
def test_check_budget_accepts(norm, eps, shape):
    get_norm(norm).check_budget(eps, shape)


def test_positive_budgets_refuse_zero():
    with pytest.raises(ValueError, match="eps must be > 0"):
        get_norm("l2").check_budget(0.0, positive=True)


def test_attacks_check_the_budget_when_built_and_against_the_image_when_called():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)).eval()
    x, y = torch.rand(2, 2, 4, 4), torch.tensor([0, 1])
    attacks.get("pgd").build(norm="l2", eps=1.5, steps=1)(model, x, y)  # above 1 is a valid L2 budget
    too_big = attacks.get("pgd").build(norm="l2", eps=6.0, steps=1)  # fine until the image is known
    with pytest.raises(ValueError, match=r"eps must be <= 5\.65685 \(the L2 diameter of a 2x4x4 image"):
        too_big(model, x, y)
    with pytest.raises(ValueError, match=r"eps must be <= 5\.65685"):
        attacks.get("deepfool").build(eps=6.0)(model, x, y)
    with pytest.raises(ValueError, match="eps must be <= 1"):
        attacks.get("pgd").build(eps=1.5)
    with pytest.raises(ValueError, match="eps must be > 0"):
        attacks.get("square").build(eps=0.0)


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_a_samples_first_draws_do_not_depend_on_how_many_are_drawn_or_on_the_batch(kind):
    """A draw of m values starts with the values a smaller draw gives, and a sample's draws are its own: attacks
    that draw as many values as the neediest sample of their batch still give each sample the same values."""
    keys = torch.arange(6) * 7919
    small = getattr(SampleRNG(keys), kind)(torch.tensor([2, 4]), (3, 5))
    large = getattr(SampleRNG(keys), kind)(torch.arange(6), (4, 5))
    assert torch.equal(large[[2, 4], :3], small)
    odd = getattr(SampleRNG(keys), kind)(torch.arange(6), (7,))  # an odd count: the last pair is cut in half
    assert torch.equal(odd, large.flatten(1)[:, :7])


def test_normal_draws_are_standard_normal_and_independent():
    """Mean 0, variance 1, the tails of a normal, and no correlation between the two values one hash gives."""
    v = SampleRNG(torch.arange(50)).normal(torch.arange(50), (4000,))
    assert abs(v.mean().item()) < 0.01 and abs(v.std().item() - 1) < 0.01
    assert abs((v.abs() > 1.96).float().mean().item() - 0.05) < 0.003
    pairs = v.reshape(-1, 2)
    assert abs(torch.corrcoef(pairs.T)[0, 1].item()) < 0.01
    flat = v.flatten()  # neighbours from two different hashes
    assert abs(torch.corrcoef(torch.stack([flat[1:-1:2], flat[2::2]]))[0, 1].item()) < 0.01
