"""Adversarial training building blocks: turn any attack into the ``make_batch`` hook of :func:`robustcnn.train.train`.

The attack runs with the model in eval mode (batch-norm running statistics, no dropout), then training mode is
restored; the training step itself then sees the adversarial batch. Randomness: each batch draws from the
attack's per-sample streams keyed by a batch counter and the seed.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from attacks import Attack
from attacks.rng import sample_keys


def attack_batches(attack: Attack, *, seed: int = 0):
    """A ``make_batch(model, x, y) -> (x_adv, y)`` that replaces each clean batch by ``attack``'s examples."""
    counter = itertools.count()

    def make_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        flags = [m.training for m in model.modules()]
        model.eval()
        try:
            batch = next(counter)
            keys = sample_keys(seed, torch.arange(x.shape[0]) + batch * x.shape[0], stream=batch)
            res = attack(model, x, y, generator=keys)
        finally:
            for m, f in zip(model.modules(), flags):
                m.training = f
        return res.x_adv.detach(), y

    return make_batch
