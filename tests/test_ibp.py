"""Interval bound propagation: sound bounds for every built-in architecture, exact at eps 0, verified samples that
no attack fools, and one-line errors for layers it cannot pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import attacks
from robustcnn.certify import bounds, check_supported, margin_lower_bounds, verified, verified_loss
from robustcnn.certify.ibp import input_box
from robustcnn.models import MODELS, build_model
from conftest import make_blobs


def _model(name: str, seed: int = 0) -> nn.Module:
    """A built-in architecture on 3x8x8 inputs with random weights and random batch-norm statistics."""
    torch.manual_seed(seed)
    model = build_model(name, in_channels=3, image_size=8, num_classes=5, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25],
                        **({"width": 4} if name in ("vgg", "resnet") else {}))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_bounds_contain_every_output_in_the_box(name):
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.rand(3, 3, 8, 8, generator=g), 0.05
    lower, upper = bounds(model, input_box(x, eps))
    y = torch.tensor([0, 2, 4])
    margins = margin_lower_bounds(model, x, y, eps)
    assert (lower <= upper).all()
    with torch.no_grad():
        for _ in range(200):
            corner = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1  # corners reach the extremes best
            mix = torch.where(torch.rand(x.shape, generator=g) < 0.5, corner, torch.rand(x.shape, generator=g) * 2 - 1)
            out = model((x + eps * mix).clamp(0, 1))
            assert (out >= lower - 1e-5).all() and (out <= upper + 1e-5).all()
            true_margin = out.gather(1, y[:, None]) - out
            assert (true_margin >= margins - 1e-5).all()
    # the elided margin is at least as tight as subtracting the logit intervals
    naive = lower.gather(1, y[:, None]) - upper
    naive.scatter_(1, y[:, None], 0.0)
    assert (margins >= naive - 1e-5).all()


@pytest.mark.parametrize("name", MODELS)
def test_bounds_at_eps_zero_are_the_forward_pass(name):
    model = _model(name)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    lower, upper = bounds(model, input_box(x, 0.0))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(lower, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upper, out, atol=1e-5, rtol=1e-5)
    y = out.argmax(1)
    margins = margin_lower_bounds(model, x, y, 0.0)
    torch.testing.assert_close(margins, out.gather(1, y[:, None]) - out, atol=1e-4, rtol=1e-4)
    assert verified(model, x, y, 0.0).tolist() == [bool((m.sort().values[1] > 0)) for m in margins]


def test_bounds_widen_with_eps_and_verification_is_monotone():
    model = _model("simple")
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    widths = [(lambda b: (b[1] - b[0]).sum())(bounds(model, input_box(x, e))) for e in (0.0, 0.01, 0.05)]
    assert widths[0] == 0 and widths[0] < widths[1] < widths[2]


class _Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("model, name", [
    (_Opaque(), "_Opaque"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.GELU(), nn.Linear(8, 3)), "GELU"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(128, 3)),
     "padding_mode"),
])
def test_unsupported_layers_are_named_in_one_line(model, name):
    with pytest.raises(ValueError, match=name) as info:
        check_supported(model) if name != "padding_mode" else verified(model, torch.rand(2, 1, 8, 8),
                                                                        torch.tensor([0, 1]), 0.1)
    assert "\n" not in str(info.value)


def test_model_must_end_in_a_linear_layer():
    with pytest.raises(ValueError, match="ends in a linear layer"):
        margin_lower_bounds(nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.ReLU()), torch.rand(1, 1, 8, 8),
                            torch.tensor([0]), 0.1)


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 16, 4))


@pytest.fixture(scope="module")
def ibp_trained():
    """A small conv net trained with IBP at eps 0.08 on the blobs task (a few seconds), with held-out test images."""
    model = _small_net()
    x, y = make_blobs(256, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(40):
        ramp = min(1.0, step / 20)
        opt.zero_grad()
        loss = (1 - 0.5 * ramp) * F.cross_entropy(model(x), y) + 0.5 * ramp * verified_loss(model, x, y, 0.08 * ramp)
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = make_blobs(128, seed=2)
    return model, xt, yt


@pytest.fixture(scope="module")
def pgd_trained():
    """The same net trained with PGD at eps 0.08 instead: its interval bounds are much looser."""
    model = _small_net()
    x, y = make_blobs(256, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    pgd = attacks.PGD(eps=0.08, norm="linf", steps=5)
    for step in range(40):
        x_adv = pgd.perturb(model.eval(), x, y, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        F.cross_entropy(model.train()(x_adv), y).backward()
        opt.step()
    model.eval()
    xt, yt = make_blobs(128, seed=2)
    return model, xt, yt


@pytest.mark.parametrize("trained,least", [("ibp_trained", 64), ("pgd_trained", 16)], ids=["ibp", "pgd"])
def test_verified_samples_are_never_fooled(trained, least, request):
    """At a budget where some samples are verified and some are fooled, no sample is both."""
    model, x, y = request.getfixturevalue(trained)
    eps = 0.12  # above the training budget: some samples verified, some fooled
    proven = verified(model, x, y, eps)
    with torch.no_grad():
        right = model(x).argmax(1) == y
    assert proven.sum() >= least, f"only {int(proven.sum())} of {len(y)} verified: the fixture did not learn"
    assert not (proven & ~right).any()  # verified implies correctly classified
    any_fooled = torch.zeros_like(proven)
    for attack in (attacks.PGD(eps=eps, norm="linf", steps=40, restarts=3),
                   attacks.APGD(eps=eps, norm="linf", steps=50, restarts=2)):
        fooled = attack(model, x, y, generator=torch.Generator().manual_seed(0)).success
        assert not (proven & fooled).any(), f"{type(attack).__name__} fooled a verified sample: unsound bounds"
        any_fooled |= fooled
    assert any_fooled.any()  # the attacks are real: they fool unverified samples


def test_verified_leaves_the_model_as_it_was(ibp_trained):
    model, x, y = ibp_trained
    model.train()
    try:
        verified(model, x[:4], y[:4], 0.05)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
