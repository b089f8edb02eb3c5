"""APGD and APGD-T — Auto-PGD, the step-size-free PGD of AutoAttack.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks",
ICML 2020. PGD with momentum (0.75) whose step size starts at ``2 * eps`` and is halved at checkpoints
``w_j = ceil(p_j * steps)`` (``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) when either
fewer than ``rho = 75 %`` of the steps since the last checkpoint raised the loss, or the step was not halved at the
last checkpoint and the best loss has not moved since; after a halving the run continues from the best point.

``APGD`` maximizes cross-entropy (``loss="ce"``, APGD-CE) or the Difference of Logits Ratio (``loss="dlr"``).
``APGDT`` is the targeted version with the targeted DLR loss: with no ``target`` it tries the ``n_target_classes``
most likely wrong classes one after another (only on samples still unfooled) to reach an untargeted goal; with a
``target`` it aims at that class. Paper defaults: 100 iterations, 1 restart, 9 target classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attacks.base import BoundedAttack, Context, check_choice, check_int, check_range
from attacks.iterative import with_restarts
from attacks.losses import Objective, dlr, get_loss
from attacks.norms import Norm, per_sample
from attacks.registry import register


def checkpoints(steps: int) -> set[int]:
    """Iterations at which APGD reconsiders its step size."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(round(q * steps, 6)) for q in p[1:] if q <= 1}  # round: 0.57 * 100 must give 57


def _apgd_run(ctx: Context, idx: Tensor, *, norm: Norm, eps: float, steps: int, objective: Objective,
              rho: float, momentum: float):
    """One APGD run over the samples at ``idx``: returns (x_adv, logits, fooled) for them.

    A sample leaves the working set once an iterate fools the model (that iterate is its result); samples never
    fooled return their highest-loss iterate.
    """
    x0 = ctx.x[idx]
    out_x, fooled = x0.clone(), torch.zeros(idx.numel(), dtype=torch.bool, device=x0.device)
    out_logits = None
    ckpts = checkpoints(steps)

    s = {"pos": torch.arange(idx.numel(), device=x0.device), "base": x0}
    s["cur"] = (x0 + norm.random(ctx.rng, idx, x0.shape[1:], eps).to(x0)).clamp(0.0, 1.0)
    logits, s["f"], s["grad"] = ctx.value_and_grad(s["cur"], idx, objective)
    out_logits = logits.new_empty(idx.numel(), logits.shape[1])
    s.update(prev=s["cur"], best_x=s["cur"], best_f=s["f"].clone(), best_grad=s["grad"], best_logits=logits,
             step=torch.full_like(s["f"], 2 * eps), ups=torch.zeros_like(s["f"]),
             ckpt_best=s["f"].clone(), halved=torch.zeros_like(s["f"], dtype=torch.bool))
    last_ckpt = 0

    for k in range(steps + 1):
        ids = idx[s["pos"]]
        adv = ctx.is_adversarial(logits, ids)
        if adv.any() or k == steps:
            done = adv if k < steps else torch.ones_like(adv)
            where = s["pos"][done]
            # fooled samples keep the fooling iterate; at the end the others keep their best-loss iterate
            out_x[where] = torch.where(per_sample(adv[done], s["cur"]), s["cur"][done], s["best_x"][done])
            out_logits[where] = torch.where(adv[done, None], logits[done], s["best_logits"][done])
            fooled[where] = adv[done]
            if k == steps:
                break
            keep = ~adv
            s = {key: v[keep] for key, v in s.items()}
            if s["pos"].numel() == 0:
                break
        # momentum step (plain step the first time), projected onto the ball and the box
        z = norm.clip(s["base"], s["cur"] + per_sample(s["step"], s["cur"]) * norm.steepest(s["grad"]), eps)
        if k > 0:
            z = norm.clip(s["base"], s["cur"] + momentum * (z - s["cur"]) + (1 - momentum) * (s["cur"] - s["prev"]), eps)
        s["prev"], s["cur"] = s["cur"], z
        ids = idx[s["pos"]]
        if k + 1 < steps:
            logits, f, s["grad"] = ctx.value_and_grad(s["cur"], ids, objective)
        else:  # the last iterate needs no gradient
            logits = ctx.logits(s["cur"], ids)
            y, t = ctx.label_of(ids)
            f = objective(logits, y, t)
        s["ups"] += (f > s["f"]).float()
        s["f"] = f
        better = f > s["best_f"]
        for key, new in (("best_x", s["cur"]), ("best_grad", s["grad"]), ("best_logits", logits)):
            s[key] = torch.where(per_sample(better, new), new, s[key])
        s["best_f"] = torch.where(better, f, s["best_f"])
        if k + 1 in ckpts and k + 1 < steps:
            stalled = s["ups"] < rho * (k + 1 - last_ckpt)
            stuck = ~s["halved"] & (s["ckpt_best"] >= s["best_f"])
            halve = stalled | stuck
            s["step"] = torch.where(halve, s["step"] / 2, s["step"])
            for key, best in (("cur", "best_x"), ("grad", "best_grad")):
                s[key] = torch.where(per_sample(halve, s[key]), s[best], s[key])
            s["halved"], s["ckpt_best"], s["ups"] = halve, s["best_f"].clone(), torch.zeros_like(s["ups"])
            last_ckpt = k + 1
    return out_x, out_logits, fooled


@dataclass(frozen=True, kw_only=True)
class _APGDBase(BoundedAttack):
    supported_norms = ("linf", "l2")

    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    momentum: float = 0.75

    def _validate(self) -> None:
        super()._validate()
        check_int("steps", self.steps)
        check_int("restarts", self.restarts)
        check_range("rho", self.rho, low=0.0, high=1.0)
        check_range("momentum", self.momentum, low=0.0, high=1.0)

    def _runner(self, objective: Objective):
        def run(ctx: Context, idx: Tensor):
            return _apgd_run(ctx, idx, norm=self.norm_obj, eps=self.eps, steps=self.steps, objective=objective,
                             rho=self.rho, momentum=self.momentum)
        return run


@register
@dataclass(frozen=True, kw_only=True)
class APGD(_APGDBase):
    """``loss``: ``ce`` (APGD-CE) or ``dlr`` (APGD-DLR)."""

    name = "apgd"
    description = "Auto-PGD: step-size-free PGD with momentum, CE or DLR loss (Croce & Hein 2020)"

    loss: str = "ce"

    def _validate(self) -> None:
        super()._validate()
        check_choice("loss", self.loss, ("ce", "dlr"))

    def _run(self, ctx):
        all_idx = torch.arange(ctx.n, device=ctx.x.device)
        x_adv, logits, _ = with_restarts(ctx, all_idx, self.restarts, self._runner(get_loss(self.loss)))
        return x_adv, logits


@register
@dataclass(frozen=True, kw_only=True)
class APGDT(_APGDBase):
    """Targeted APGD with the targeted DLR loss; ``n_target_classes`` top wrong classes are tried in turn."""

    name = "apgd-t"
    description = "Targeted Auto-PGD over the top wrong classes with the targeted DLR loss (Croce & Hein 2020)"

    n_target_classes: int = 9

    def _validate(self) -> None:
        super()._validate()
        check_int("n_target_classes", self.n_target_classes)

    def _run(self, ctx):
        run = self._runner(dlr)
        all_idx = torch.arange(ctx.n, device=ctx.x.device)
        if ctx.targeted:
            x_adv, logits, _ = with_restarts(ctx, all_idx, self.restarts, run)
            return x_adv, logits
        clean = ctx.logits(ctx.x, all_idx)
        # classes ranked by the clean logits, the true class left out: column i is the (i+1)-th likeliest wrong one
        ranked = clean.sort(dim=1, descending=True).indices
        wrong = ranked[ranked != ctx.y[:, None]].reshape(ctx.n, -1)
        out_x, out_logits = ctx.x.clone(), clean.clone()
        done = ctx.is_adversarial(clean, all_idx)
        for i in range(min(self.n_target_classes, wrong.shape[1])):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            view = ctx.retarget(wrong[:, i])
            x_r, logits_r, fooled = with_restarts(view, idx, self.restarts, run)
            out_x[idx], out_logits[idx] = x_r, logits_r  # unfooled samples keep their latest attempt
            done[idx[fooled]] = True
        return out_x, out_logits
