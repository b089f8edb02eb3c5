"""Behaviour of the white-box family beyond the contract: strength orderings, maths, early exit, cost counting."""

from __future__ import annotations

import math

import pytest
import torch

import attacks
from attacks.apgd import checkpoints
from attacks.norms import get_norm
from attacks.rng import SampleRNG, sample_keys


def _acc(model, res, y):
    with torch.no_grad():
        return (model(res.x_adv).argmax(1) == y).float().mean().item()


def test_fgsm_is_exactly_one_signed_step(trained):
    model, x, y = trained
    eps = 0.05
    res = attacks.FGSM(eps=eps)(model, x, y)
    xg = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xg)
    expected = (x + eps * g.sign()).clamp(0, 1)
    with torch.no_grad():
        already_wrong = model(x).argmax(1) != y
    # samples misclassified before the attack are returned untouched (already adversarial)
    expected[already_wrong] = x[already_wrong]
    assert torch.allclose(res.x_adv, expected, atol=1e-6)
    assert (res.queries == torch.where(already_wrong, 1, 2)).all() and (res.gradients == 1).all()


def test_accuracy_non_increasing_in_eps_and_steps(trained):
    model, x, y = trained
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    by_eps = [_acc(model, attacks.PGD(eps=e, steps=10)(model, x, y, generator=gen()), y) for e in (0.0, 0.1, 0.15, 0.2)]
    assert by_eps[0] >= 0.95 and all(a >= b for a, b in zip(by_eps, by_eps[1:])) and by_eps[-1] < by_eps[0]
    by_steps = [_acc(model, attacks.BIM(eps=0.15, steps=s, alpha=0.03)(model, x, y), y) for s in (1, 3, 10)]
    assert all(a >= b for a, b in zip(by_steps, by_steps[1:])) and by_steps[-1] < by_steps[0]


def test_restarts_never_raise_accuracy(trained):
    model, x, y = trained
    one = attacks.PGD(eps=0.14, steps=5, restarts=1)(model, x, y, generator=torch.Generator().manual_seed(3))
    five = attacks.PGD(eps=0.14, steps=5, restarts=5)(model, x, y, generator=torch.Generator().manual_seed(3))
    assert 0 < one.success.sum() < len(y)
    assert five.success.sum() >= one.success.sum()
    assert (five.success | ~one.success).all(), "a sample fooled by the first start must stay fooled"
    assert (five.queries[~one.success] > one.queries[~one.success]).all(), "restarts ran on the unfooled samples"


def test_early_exit_saves_work_and_loses_nothing(trained):
    model, x, y = trained
    fast = attacks.PGD(eps=0.2, steps=20)(model, x, y, generator=torch.Generator().manual_seed(0))
    full = attacks.PGD(eps=0.2, steps=20, early_stop=False)(model, x, y, generator=torch.Generator().manual_seed(0))
    assert fast.gradients.sum() < full.gradients.sum() / 2
    assert (full.gradients == 20).all() and (full.queries == 21).all()
    assert fast.success.sum() >= full.success.sum()


def test_pgd_l2_respects_the_ball_and_moves_to_its_surface(trained):
    model, x, y = trained
    res = attacks.PGD(eps=0.5, norm="l2", steps=10, early_stop=False)(model, x, y)
    n = res.x_adv.sub(x).flatten(1).norm(dim=1)
    assert (n <= 0.5 + 1e-5).all() and n.median() > 0.4


def test_apgd_beats_or_matches_pgd_and_dlr_works(trained):
    model, x, y = trained
    pgd = attacks.PGD(eps=0.15, steps=20)(model, x, y)
    apgd = attacks.APGD(eps=0.15, steps=20)(model, x, y)
    dlr = attacks.APGD(eps=0.15, steps=20, loss="dlr")(model, x, y)
    assert _acc(model, apgd, y) <= _acc(model, pgd, y) + 1 / len(y)
    assert dlr.success.float().mean() > 0


def test_apgd_checkpoints_follow_the_paper():
    w = sorted(checkpoints(100))
    assert w[:4] == [22, 41, 57, 70] and max(w) <= 100


def test_apgd_t_tries_targets_only_on_survivors(trained):
    model, x, y = trained
    res = attacks.APGDT(eps=0.15, steps=5, n_target_classes=3)(model, x, y)
    # 1 clean pass + at most 3 targets x (5 gradient steps + 1 final pass) per sample
    assert res.queries.max() <= 1 + 3 * 6
    assert res.success.any() and (res.queries[res.success] < 1 + 3 * 6).all()


def test_deepfool_and_cw_find_small_l2_perturbations(trained):
    model, x, y = trained
    df = attacks.DeepFool()(model, x, y)
    cw = attacks.CarliniWagner(steps=100, binary_steps=4, c=1.0, lr=0.05)(model, x, y)
    pgd_small = attacks.PGD(eps=float(df.norms[df.success].median()) * 0.5, norm="l2", steps=20)(model, x, y)
    assert df.success.float().mean() > 0.95 and cw.success.float().mean() > 0.9
    # half the median DeepFool norm fools clearly fewer samples than DeepFool does
    assert pgd_small.success.float().mean() < df.success.float().mean()
    # with a budget, a minimum-norm attack only counts perturbations that fit it
    capped = attacks.DeepFool(eps=float(df.norms.median()))(model, x, y)
    assert (capped.norms <= df.norms.median() * (1 + 1e-5)).all()
    assert 0.3 < capped.success.float().mean() < 0.8


def test_mifgsm_momentum_differs_from_bim(trained):
    model, x, y = trained
    mi = attacks.MIFGSM(eps=0.05, steps=5, early_stop=False)(model, x, y)
    bim = attacks.BIM(eps=0.05, steps=5, alpha=0.01, early_stop=False)(model, x, y)
    assert not torch.equal(mi.x_adv, bim.x_adv)


def test_eot_averages_over_a_random_model(trained):
    model, x, y = trained

    class Noisy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inp):
            return self.inner(inp) + 0.5 * torch.randn(inp.shape[0], 4)

    noisy = Noisy(model).eval()
    torch.manual_seed(0)
    res = attacks.EOTPGD(eps=0.1, steps=3, eot_samples=4, early_stop=False)(noisy, x, y)
    assert (res.gradients == 12).all() and (res.queries == 13).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_norm_maths(norm):
    nm = get_norm(norm)
    d = nm.random(SampleRNG(sample_keys(0, torch.arange(200))), torch.arange(200), (3, 4, 4), 0.3)
    assert (nm.measure(d) <= 0.3 + 1e-6).all()
    big = torch.randn(5, 3, 4, 4)
    assert torch.allclose(nm.measure(nm.project(big, 0.2)), torch.full((5,), 0.2), atol=1e-5)
    step = nm.steepest(torch.randn(5, 3, 4, 4))
    assert torch.allclose(nm.measure(step), torch.ones(5), atol=1e-5)
    if norm == "l2":  # uniform in the ball: radius quantiles follow U^(1/d)
        r = nm.measure(d) / 0.3
        assert math.isclose(float(r.median()), 0.5 ** (1 / 48), rel_tol=0.02)


def test_l0_counts_pixels_not_channels():
    d = torch.zeros(2, 3, 4, 4)
    d[0, :, 1, 1] = 0.5  # one pixel, all channels
    d[1, 0, 0, 0] = d[1, 2, 3, 3] = 0.1  # two pixels
    assert get_norm("l0").measure(d).tolist() == [1.0, 2.0]


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("name, kw", [("pgd", {"steps": 3, "early_stop": False}), ("fgsm", {"early_stop": False}),
                                      ("pgd", {"steps": 3, "restarts": 2, "early_stop": False})])
def test_perturb_returns_the_same_examples_without_the_verification_passes(trained, name, kw):
    """Attack.perturb (adversarial training) gives __call__'s x_adv, inside the budget, with fewer model passes."""
    model, x, y = trained
    x, y = x[:32], y[:32]
    atk = attacks.build(name, eps=0.1, **kw)
    keys = sample_keys(4, torch.arange(32))
    counted = _Counting(model).eval()
    res = atk(counted, x, y, generator=keys)
    full = counted.rows
    counted.rows = 0
    x_adv = atk.perturb(counted, x, y, generator=keys)
    assert counted.rows < full
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    if kw.get("restarts", 1) == 1:
        assert torch.equal(x_adv, res.x_adv)


def test_pgd_begins_at_a_warm_start(trained):
    """With a start, PGD's first iterate is x + the start projected onto the ball (no random draw): one step from
    there is exactly one signed gradient step, and examples found earlier fool again at once."""
    model, x, y = trained
    eps, alpha = 0.1, 0.03
    start = 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_adv = attacks.PGD(eps=eps, steps=1, alpha=alpha, early_stop=False).perturb(model, x, y, start=start)
    first = (x + start.clamp(-eps, eps)).clamp(0, 1).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(first), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, first)
    expected = torch.minimum(torch.maximum(first.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)

    found = attacks.PGD(eps=0.3, steps=10)(model, x, y)
    again = attacks.PGD(eps=0.3, steps=10)(model, x, y, start=found.x_adv - x)
    fooled = found.success
    assert fooled.any() and again.success[fooled].all()
    assert (again.queries[fooled] == 1).all() and torch.allclose(again.x_adv[fooled], found.x_adv[fooled])
