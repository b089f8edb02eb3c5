"""APGD and APGD-T — Auto-PGD, the step-size-free PGD of AutoAttack.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks",
ICML 2020. PGD with momentum (0.75) whose step size starts at ``2 * eps`` and is halved at checkpoints
``w_j = ceil(p_j * steps)`` (``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) when either
fewer than ``rho = 75 %`` of the steps since the last checkpoint raised the loss, or the step was not halved at the
last checkpoint and the best loss has not moved since; after a halving the run continues from the best point.

``APGD`` maximizes cross-entropy (``loss="ce"``, APGD-CE) or the Difference of Logits Ratio (``loss="dlr"``).
``APGDT`` is the targeted version with the targeted DLR loss: with no ``target`` it tries ``n_target_classes`` wrong
classes one after another (only on samples still unfooled; from the ``first_target``-th in the order ``rank`` gives:
highest clean logit first, or nearest boundary first) to reach an untargeted goal; with a ``target`` it aims at that
class. Paper defaults: 100 iterations, 1 restart, 9 target classes ranked by logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attacks.base import MAX_RESTARTS, BoundedAttack, Context, check_choice, check_int, check_range
from attacks.iterative import with_restarts
from attacks.losses import Objective, dlr, get_loss
from attacks.norms import Norm, per_sample
from attacks.params import param
from attacks.registry import register
from attacks.workset import Results, WorkSet


def checkpoints(steps: int) -> set[int]:
    """Iterations at which APGD reconsiders its step size."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(round(q * steps, 6)) for q in p[1:] if q <= 1}  # round: 0.57 * 100 must give 57


def _start(ctx: Context, idx: Tensor, norm: Norm, eps: float, objective: Objective) -> tuple[WorkSet, Tensor]:
    """The work set of one APGD run over the samples at ``idx``, at a random point of the ball, and its logits.

    Per-sample state: ``base`` (the clean input), ``cur`` and ``prev`` (the iterate and the one before), ``loss`` and
    ``grad`` at ``cur``; ``best_x``, ``best_loss``, ``best_grad``, ``best_logits`` (the highest-loss iterate so far);
    ``step`` (the step size), ``rises`` (steps since the last checkpoint that raised the loss), ``ckpt_best`` (the
    best loss at the last checkpoint) and ``halved`` (whether the step was halved there).
    """
    x0 = ctx.x[idx]
    work = WorkSet(Results(x0, ids=idx), torch.arange(idx.numel(), device=x0.device), base=x0)
    work.cur = (x0 + norm.random(ctx.rng, idx, x0.shape[1:], eps).to(x0)).clamp(0.0, 1.0)
    logits, work.loss, work.grad = ctx.value_and_grad(work.cur, idx, objective)
    work.prev, work.best_x, work.best_loss = work.cur, work.cur, work.loss.clone()
    work.best_grad, work.best_logits = work.grad, logits
    work.step = torch.full_like(work.loss, 2 * eps)
    work.rises = torch.zeros_like(work.loss)
    work.ckpt_best, work.halved = work.loss.clone(), torch.zeros_like(work.loss, dtype=torch.bool)
    return work, logits


def _momentum_step(work: WorkSet, norm: Norm, eps: float, momentum: float, first: bool) -> None:
    """Move ``cur``: a steepest-ascent step of size ``step``, then (after the first) the momentum mix with the last
    move, each projected onto the ball and the box."""
    z = norm.clip(work.base, work.cur + per_sample(work.step, work.cur) * norm.steepest(work.grad), eps)
    if not first:
        z = norm.clip(work.base, work.cur + momentum * (z - work.cur) + (1 - momentum) * (work.cur - work.prev), eps)
    work.prev, work.cur = work.cur, z


def _track(work: WorkSet, loss: Tensor, logits: Tensor) -> None:
    """Count a rise of the loss at the new iterate and keep it as the best where its loss is the highest yet."""
    work.rises += (loss > work.loss).float()
    work.loss = loss
    better = loss > work.best_loss
    work.best_x = torch.where(per_sample(better, work.cur), work.cur, work.best_x)
    work.best_grad = torch.where(per_sample(better, work.grad), work.grad, work.best_grad)
    work.best_logits = torch.where(per_sample(better, logits), logits, work.best_logits)
    work.best_loss = torch.where(better, loss, work.best_loss)


def _checkpoint(work: WorkSet, rho: float, since: int) -> None:
    """Halve the step where fewer than ``rho`` of the ``since`` steps since the last checkpoint raised the loss, or
    where the step was not halved last time and the best loss has not moved; those samples go back to their best
    point."""
    stalled = work.rises < rho * since
    stuck = ~work.halved & (work.ckpt_best >= work.best_loss)
    halve = stalled | stuck
    work.step = torch.where(halve, work.step / 2, work.step)
    work.cur = torch.where(per_sample(halve, work.cur), work.best_x, work.cur)
    work.grad = torch.where(per_sample(halve, work.grad), work.best_grad, work.grad)
    work.halved, work.ckpt_best, work.rises = halve, work.best_loss.clone(), torch.zeros_like(work.rises)


def _apgd_run(ctx: Context, idx: Tensor, *, norm: Norm, eps: float, steps: int, objective: Objective,
              rho: float, momentum: float):
    """One APGD run over the samples at ``idx``: returns (x_adv, logits, fooled) for them.

    A sample leaves the work set once an iterate fools the model (that iterate is its result); samples never
    fooled return their highest-loss iterate.
    """
    ckpts = checkpoints(steps)
    work, logits = _start(ctx, idx, norm, eps, objective)
    results = work.results
    last_ckpt = 0

    for k in range(steps + 1):
        adv = ctx.is_adversarial(logits, work.ids)
        if adv.any() or k == steps:
            done = adv if k < steps else torch.ones_like(adv)
            fooled = adv[done]
            # fooled samples keep the fooling iterate; at the end the others keep their best-loss iterate
            work.record(done, torch.where(per_sample(fooled, work.cur), work.cur[done], work.best_x[done]),
                        torch.where(fooled[:, None], logits[done], work.best_logits[done]), fooled)
            if k == steps:
                break
            work.keep(~adv)
            if work.empty:
                break
        _momentum_step(work, norm, eps, momentum, first=k == 0)
        if k + 1 < steps:
            logits, loss, work.grad = ctx.value_and_grad(work.cur, work.ids, objective)
        else:  # the last iterate needs no gradient
            logits = ctx.logits(work.cur, work.ids)
            y, t = ctx.label_of(work.ids)
            loss = objective(logits, y, t)
        _track(work, loss, logits)
        if k + 1 in ckpts and k + 1 < steps:
            _checkpoint(work, rho, k + 1 - last_ckpt)
            last_ckpt = k + 1
    return results.x_adv, results.logits, results.fooled


@dataclass(frozen=True, kw_only=True)
class _APGDBase(BoundedAttack):
    supported_norms = ("linf", "l2")

    steps: int = param(100, "Iterations per run.", fast=10)
    restarts: int = param(1, "Runs from random starts; each later one only for the samples still unfooled.")
    rho: float = param(0.75, "The step size is halved at a checkpoint when fewer than this fraction of the steps "
                             "since the last one raised the loss.")
    momentum: float = param(0.75, "Weight of the new gradient step against the previous step's direction.")

    def _validate(self) -> None:
        super()._validate()
        check_int("steps", self.steps)
        check_int("restarts", self.restarts, high=MAX_RESTARTS)
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
    name = "apgd"
    description = "Auto-PGD: step-size-free PGD with momentum, CE or DLR loss (Croce & Hein 2020)"

    loss: str = param("ce", "Loss to maximize: ce (APGD-CE) or dlr (APGD-DLR).")

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
    """Targeted APGD with the targeted DLR loss."""

    name = "apgd-t"
    description = "Targeted Auto-PGD over the top wrong classes with the targeted DLR loss (Croce & Hein 2020)"

    n_target_classes: int = param(9, "Untargeted: how many wrong classes are aimed at in turn (in the order of "
                                     "rank), each only for the samples still unfooled.", fast=2)
    first_target: int = param(1, "Untargeted: the rank among the wrong classes of the first one aimed at (1: the "
                                 "first; 4: skip the first three).")
    rank: str = param("logit", "Untargeted: how the wrong classes are ranked: logit (by clean logit, highest "
                               "first) or distance (by the linearized distance to each class's decision boundary "
                               "in the budget's norm, nearest first; one input gradient per class).")

    def _validate(self) -> None:
        super()._validate()
        check_int("n_target_classes", self.n_target_classes)
        check_int("first_target", self.first_target)
        check_choice("rank", self.rank, ("logit", "distance"))

    def _ranked(self, ctx: Context, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The clean logits and, per sample, its wrong classes in the order they are aimed at (n, K-1)."""
        if self.rank == "logit":
            clean = ctx.logits(ctx.x, idx)
            score = clean.clone()
        else:
            xg = ctx.x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits = ctx.forward_graph(xg, idx)
                classes = logits.shape[1]
                rows = torch.arange(ctx.n, device=xg.device)
                grads = []
                for k in range(classes):  # one input gradient per class (the Jacobian, row by row)
                    (g,) = torch.autograd.grad(logits[:, k].sum(), xg, retain_graph=k + 1 < classes)
                    grads.append(g)
            ctx.charge_gradients(idx, classes)
            clean = logits.detach()
            jac = torch.stack(grads, dim=1)  # (n, K, C, H, W)
            gap = clean.gather(1, ctx.y[:, None]) - clean  # margin to each class
            towards = jac[rows, ctx.y][:, None] - jac  # gradient of that margin
            size = self.norm_obj.dual.measure(towards.flatten(0, 1)).reshape(ctx.n, classes)
            score = -(gap / size.clamp_min(1e-12))  # nearest boundary first
        score[torch.arange(ctx.n, device=score.device), ctx.y] = -float("inf")
        ranked = score.sort(dim=1, descending=True, stable=True).indices
        # the true class left out: column i is the (i+1)-th wrong class in the order aimed at
        return clean, ranked[ranked != ctx.y[:, None]].reshape(ctx.n, -1)

    def _run(self, ctx):
        run = self._runner(dlr)
        all_idx = torch.arange(ctx.n, device=ctx.x.device)
        if ctx.targeted:
            x_adv, logits, _ = with_restarts(ctx, all_idx, self.restarts, run)
            return x_adv, logits
        clean, wrong = self._ranked(ctx, all_idx)
        out_x, out_logits = ctx.x.clone(), clean.clone()
        done = ctx.is_adversarial(clean, all_idx)
        for i in range(self.first_target - 1, min(self.first_target - 1 + self.n_target_classes, wrong.shape[1])):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            view = ctx.retarget(wrong[:, i])
            x_r, logits_r, fooled = with_restarts(view, idx, self.restarts, run)
            out_x[idx], out_logits[idx] = x_r, logits_r  # unfooled samples keep their latest attempt
            done[idx[fooled]] = True
        return out_x, out_logits
