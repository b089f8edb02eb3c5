"""The one gradient-ascent loop behind FGSM, BIM, PGD, MI-FGSM and EOT-PGD.

The attacks differ only in their settings: one step or many, a random start or not, momentum, restarts, an
average over the model's randomness (EOT). Norm maths comes from :mod:`attacks.norms`.

Work tracking: the loop keeps its state in a :class:`~attacks.workset.WorkSet`, compacted to the samples it still
works on. With ``early_stop=True`` (the default, right for measuring robust accuracy) a sample leaves the work set
as soon as one iterate fools the model, and that iterate is its result; every later pass runs on fewer samples.
With ``early_stop=False`` every sample takes every step and the last iterate is returned (classic PGD, right for
adversarial training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attacks.base import Context
from attacks.losses import Objective
from attacks.norms import Norm
from attacks.workset import Results, WorkSet


def _value_and_grad(ctx: Context, x: Tensor, ids: Tensor, objective: Objective, eot_samples: int):
    """Logits and input gradient, averaged over ``eot_samples`` passes when the model is random (EOT)."""
    logits, _, grad = ctx.value_and_grad(x, ids, objective)
    for _ in range(eot_samples - 1):
        more_logits, _, more_grad = ctx.value_and_grad(x, ids, objective)
        logits, grad = logits + more_logits, grad + more_grad
    if eot_samples > 1:
        logits, grad = logits / eot_samples, grad / eot_samples
    return logits, grad


def _l1_normalized(g: Tensor) -> Tensor:
    return g / g.abs().flatten(1).sum(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (g.dim() - 1)))


@dataclass(frozen=True)
class AscentSettings:
    """What one run of :func:`gradient_ascent` does: maximize ``objective`` with ``steps`` steps of size ``alpha``
    inside the ``eps``-ball of ``norm``, from a random start or the clean input, with optional ``momentum``
    (MI-FGSM), ``eot_samples`` passes averaged per gradient, and ``early_stop`` (a sample leaves once fooled)."""

    norm: Norm
    eps: float
    alpha: float
    steps: int
    objective: Objective
    random_start: bool = False
    momentum: Optional[float] = None
    eot_samples: int = 1
    early_stop: bool = True


def _starting_point(ctx: Context, idx: Tensor, x0: Tensor, run: AscentSettings, start: Optional[Tensor]) -> Tensor:
    """The first iterate: the given ``start`` projected, else a random point of the ball, else a copy of ``x0``."""
    if start is not None:
        return run.norm.project(start, run.eps).add(x0).clamp_(0.0, 1.0)
    if run.random_start:
        return run.norm.random(ctx.rng, idx, x0.shape[1:], run.eps).to(x0).add_(x0).clamp_(0.0, 1.0)
    return x0.clone()  # the loop updates its iterate in place


def _single_run(ctx: Context, idx: Tensor, run: AscentSettings,
                start: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """One run from one start over the samples at ``idx``: returns (x_adv, logits, fooled) for those samples.

    ``start``: the samples' given starting perturbations (projected here), else a random or the clean start.

    The per-step work outside the model is kept to a few in-place passes (:meth:`Norm.ascend`, with the Linf box
    ``[max(x - eps, 0), min(x + eps, 1)]`` computed once), success is read from the logits the step's own forward
    pass produced, and without early exit nothing waits on the device between steps.
    """
    n = idx.numel()
    whole = n == ctx.n and bool(torch.equal(idx, torch.arange(n, device=idx.device)))
    x0 = ctx.x if whole else ctx.x[idx]  # never written to
    results = Results(x0, ids=idx)  # filled only when a sample leaves early or at the end
    work = WorkSet(results, torch.arange(n, device=x0.device), base=x0, box=run.norm.box(x0, run.eps),
                   cur=_starting_point(ctx, idx, x0, run, start),
                   velocity=torch.zeros_like(x0) if run.momentum is not None else None)

    for t in range(run.steps + 1):
        last = t == run.steps
        if last and not ctx.verify and not run.early_stop:  # Attack.perturb: nobody reads the final success
            return work.cur, None, results.fooled
        if last:
            logits = ctx.logits(work.cur, work.ids)
            adv = ctx.is_adversarial(logits, work.ids)
            if not results.recorded:  # nobody left early: the last iterate is the result as it is
                return work.cur, logits, adv
            work.retire_all(work.cur, logits, adv)
            break
        logits, work.grad = _value_and_grad(ctx, work.cur, work.ids, run.objective, run.eot_samples)
        if run.early_stop:  # the samples that no longer resist leave with their iterate
            adv = ctx.is_adversarial(logits, work.ids)
            work.retire(adv, work.cur, logits, adv)
            if work.empty:
                break

        if work.velocity is not None:
            work.velocity = run.momentum * work.velocity + _l1_normalized(work.grad)
            work.grad = work.velocity.clone()  # ascend may overwrite its gradient argument
        work.cur = run.norm.ascend(work.cur, work.grad, run.alpha, work.base, run.eps, work.box)

    return results.x_adv, results.logits, results.fooled


def with_restarts(ctx: Context, idx: Tensor, restarts: int, run) -> tuple[Tensor, Tensor, Tensor]:
    """Call ``run(ctx, idx) -> (x_adv, logits, fooled)`` up to ``restarts`` times, each later time only on the
    samples still unfooled, so more restarts can only lower accuracy. Returns results for the samples at ``idx``."""
    x_out, logits_out, fooled = run(ctx, idx)
    if logits_out is None:  # Attack.perturb without early exit: which samples are fooled is unknown, keep the run
        return x_out, logits_out, fooled
    for _ in range(restarts - 1):
        left = (~fooled).nonzero().squeeze(1)
        if left.numel() == 0:
            break
        x_r, logits_r, fooled_r = run(ctx, idx[left])
        won = left[fooled_r]
        x_out[won], logits_out[won], fooled[won] = x_r[fooled_r], logits_r[fooled_r], True
    return x_out, logits_out, fooled


def gradient_ascent(
    ctx: Context,
    *,
    norm: Norm,
    eps: float,
    alpha: float,
    steps: int,
    objective: Objective,
    random_start: bool = False,
    restarts: int = 1,
    momentum: Optional[float] = None,
    eot_samples: int = 1,
    early_stop: bool = True,
) -> tuple[Tensor, Tensor]:
    """Maximize ``objective`` inside the ``eps``-ball of ``norm`` around ``ctx.x``; returns (x_adv, logits).

    The first run begins at ``ctx.start`` when the caller gave one; restarts draw their own starts.
    """
    settings = AscentSettings(norm=norm, eps=eps, alpha=alpha, steps=steps, objective=objective,
                              random_start=random_start, momentum=momentum, eot_samples=eot_samples,
                              early_stop=early_stop)
    start = ctx.start

    def run(ctx: Context, idx: Tensor):
        nonlocal start
        first, start = start, None  # only the first run begins at the caller's start
        return _single_run(ctx, idx, settings, start=None if first is None else first[idx])

    x_adv, logits, _ = with_restarts(ctx, torch.arange(ctx.n, device=ctx.x.device), restarts, run)
    return x_adv, logits
