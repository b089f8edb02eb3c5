"""Shared fixtures: a tiny CNN trained in about a second on a synthetic task, so attacks have something to break."""

from __future__ import annotations

import pytest
import torch
from torch import nn


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
