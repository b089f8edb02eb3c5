"""Shared fixtures: a tiny CNN trained in about a second on a synthetic task, so attacks have something to break,
and one quick CLI-trained shapes model for the command tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train_fixtures import isolated  # noqa: F401  (fixture used by `newest`)


def make_blobs(n: int, seed: int, classes: int = 4, size: int = 8):
    """Images whose class is a bright quadrant (plus noise): easy to learn, easy to attack."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = 0.25 + 0.1 * torch.randn(n, 1, size, size, generator=g)
    h = size // 2
    for c in range(classes):
        r, q = divmod(c, 2)
        x[y == c, :, r * h : (r + 1) * h, q * h : (q + 1) * h] += 0.35
    return x.clamp(0, 1), y


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, classes)
        )

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="session")
def trained():
    """(model in eval mode, x_test, y_test) with the model >= 95 % accurate on x_test."""
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = make_blobs(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    xt, yt = make_blobs(64, seed=2)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc >= 0.95, f"fixture model only {acc:.2f} accurate"
    return model, xt, yt


#: A quick model that really learns the shapes task (about 90 % test accuracy), for CLI attack/report tests.
QUICK_TRAIN = ("--dataset", "shapes", "--model", "simple", "--limit", "2048", "--epochs", "3", "--optimizer", "adam",
               "--batch-size", "64", "--device", "cpu")


@pytest.fixture(scope="session")
def model_env(tmp_path_factory):
    """Train QUICK_TRAIN once per session through the CLI; returns (root folder, environment variables)."""
    from train_fixtures import train_run_via_cli

    root = tmp_path_factory.mktemp("quick-model")
    _, env = train_run_via_cli(root, *QUICK_TRAIN)
    return root, env


@pytest.fixture
def newest(model_env, isolated, monkeypatch):
    """This test's environment points at the session's quick model (the newest run)."""
    root, env = model_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return root
