"""robustcnn.adversarial: attacks as the training batch transform."""

from __future__ import annotations

import torch

import attacks
from robustcnn.adversarial import attack_batches


def test_attack_batches_perturbs_every_sample_within_budget_and_restores_mode(trained):
    model, x, y = trained
    model.train()
    try:
        make = attack_batches(attacks.FGSM(eps=0.1, early_stop=False), seed=0)
        xa, ya = make(model, x, y)
        assert model.training and torch.equal(ya, y)
    finally:
        model.eval()
    delta = (xa - x).abs().flatten(1).amax(1)
    assert (delta <= 0.1 + 1e-6).all() and (delta > 0.09).all(), "every sample takes the full FGSM step"


def test_attack_batches_is_deterministic_per_seed(trained):
    model, x, y = trained
    pgd = attacks.PGD(eps=0.1, steps=3, early_stop=False)
    a1, _ = attack_batches(pgd, seed=1)(model, x, y)
    a2, _ = attack_batches(pgd, seed=1)(model, x, y)
    b, _ = attack_batches(pgd, seed=2)(model, x, y)
    assert torch.equal(a1, a2) and not torch.equal(a1, b)
