"""Carlini-Wagner L2 — the optimization attack for minimum L2 perturbations.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017. Change of variables
``x' = (tanh(w) + 1) / 2`` keeps the image in the box; Adam minimizes ``||x' - x||_2^2 + c * f(x')`` with the margin
``f = max(z_y - max_{i != y} z_i, -kappa)`` (targeted: ``max(max_{i != t} z_i - z_t, -kappa)``); a per-sample binary
search adjusts ``c``. Defaults from the authors' reference settings: 9 binary-search steps from ``c = 1e-3``,
Adam with learning rate 0.01, ``kappa = 0``, early abort when the objective stalls; 1,000 iterations per search
step (the paper allows up to 10,000 — raise ``steps`` for the last fraction of a percent).

A minimum-norm attack: with ``eps=None`` it reports the smallest L2 it found; with ``eps`` set, a sample counts as
fooled only inside that budget, and a sample is dropped from the work as soon as it has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import MinNormAttack, check_int, check_range
from attacks.losses import margin
from attacks.optim import Adam
from attacks.params import param
from attacks.registry import register


@register
@dataclass(frozen=True, kw_only=True)
class CarliniWagner(MinNormAttack):
    name = "cw"
    supported_norms = ("l2",)
    description = "Carlini-Wagner L2: Adam in tanh space with a binary search over c (Carlini & Wagner 2017)"

    c: float = param(1e-3, "Initial trade-off constant between the L2 distance and the margin term (each "
                           "sample's binary search adjusts it).", fast=1.0)
    kappa: float = param(0.0, "Confidence: the margin, in logits, by which x_adv must clear the boundary.")
    steps: int = param(1000, "Adam iterations per binary-search step.", fast=50)
    binary_steps: int = param(9, "Binary-search steps over c.", fast=2)
    lr: float = param(0.01, "Adam's learning rate (in tanh space).", fast=0.05)
    abort_early: bool = param(True, "End a binary-search step early when the objective stalls.")

    def _validate(self) -> None:
        super()._validate()
        check_range("c", self.c, low=0.0)
        check_range("kappa", self.kappa, low=0.0, low_inclusive=True)
        check_int("steps", self.steps)
        check_int("binary_steps", self.binary_steps)
        check_range("lr", self.lr, low=0.0)

    def _run(self, ctx):
        x = ctx.x
        n = ctx.n
        w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        best_x = x.clone()
        c = torch.full((n,), self.c, device=x.device)
        lower, upper = torch.zeros_like(c), torch.full_like(c, 1e10)
        budget = float("inf") if self.eps is None else self.eps
        for _ in range(self.binary_steps):
            # unbounded: every sample keeps shrinking its perturbation; bounded: only those without one inside eps
            todo = best_l2 > budget if self.eps is not None else torch.ones_like(best_l2, dtype=torch.bool)
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            found = self._search(ctx, idx, w0[idx], c[idx], best_l2, best_x, budget)
            # binary search on c: smaller after a success, larger (x10 until bracketed) after a failure
            ci, lo, up = c[idx], lower[idx], upper[idx]
            up = torch.where(found, torch.minimum(up, ci), up)
            lo = torch.where(found, lo, torch.maximum(lo, ci))
            ci = torch.where(up < 1e9, (lo + up) / 2, ci * 10)
            c[idx], lower[idx], upper[idx] = ci, lo, up
        return best_x, None

    def _search(self, ctx, idx, w, c, best_l2, best_x, budget):
        """Adam over ``w`` for the samples at ``idx``; updates ``best_l2``/``best_x`` in place, returns found-mask."""
        x = ctx.x[idx]
        w = w.clone()
        adam = Adam(self.lr)
        moments = adam.moments(w)
        found = torch.zeros(idx.numel(), dtype=torch.bool, device=x.device)
        y, t = ctx.label_of(idx)
        prev = float("inf")
        for it in range(1, self.steps + 1):
            wg = w.detach().requires_grad_(True)
            with torch.enable_grad():
                x_new = (torch.tanh(wg) + 1) / 2
                logits = ctx.forward_graph(x_new, idx)
                l2sq = (x_new - x).flatten(1).pow(2).sum(dim=1)
                f = (-margin(logits, y, t)).clamp_min(-self.kappa)
                loss = l2sq + c * f
                (grad,) = torch.autograd.grad(loss.sum(), wg)
            ctx.charge_gradients(idx)
            # best so far among adversarial iterates (with the kappa margin, as in the paper)
            with torch.no_grad():
                adv = ctx.is_adversarial(logits, idx) & (margin(logits, y, t) >= self.kappa)
                l2 = l2sq.sqrt()
                better = adv & (l2 < best_l2[idx])
                if better.any():
                    best_l2[idx[better]] = l2[better]
                    best_x[idx[better]] = x_new[better].detach()
                found |= adv
            move, moments = adam.step(moments, grad, it)
            w = w - move
            if self.abort_early and it % max(1, self.steps // 10) == 0:
                total = loss.sum().item()
                if total > prev * 0.9999:
                    break
                prev = total
            if budget != float("inf") and bool((best_l2[idx] <= budget).all()):
                break
        return found
