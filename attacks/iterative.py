"""The one gradient-ascent loop behind FGSM, BIM, PGD, MI-FGSM and EOT-PGD.

The attacks differ only in their settings: one step or many, a random start or not, momentum, restarts, an
average over the model's randomness (EOT). Norm maths comes from :mod:`attacks.norms`.

Work tracking: the loop keeps its state *compacted* to the samples it still works on. With ``early_stop=True``
(the default, right for measuring robust accuracy) a sample leaves the working set as soon as one iterate fools
the model, and that iterate is its result; every later pass runs on fewer samples. With ``early_stop=False``
every sample takes every step and the last iterate is returned (classic PGD, right for adversarial training).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attacks.base import Context
from attacks.losses import Objective
from attacks.norms import Norm


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
    return g / g.abs().reshape(g.shape[0], -1).sum(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (g.dim() - 1)))


def _single_run(
    ctx: Context,
    idx: Tensor,
    *,
    norm: Norm,
    eps: float,
    alpha: float,
    steps: int,
    objective: Objective,
    random_start: bool,
    momentum: Optional[float],
    eot_samples: int,
    early_stop: bool,
    start: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One run from one start over the samples at ``idx``: returns (x_adv, logits, fooled) for those samples.

    ``start``: the samples' given starting perturbations (projected here), else a random or the clean start.

    The per-step work outside the model is kept to a few in-place passes (:meth:`Norm.ascend`, with the Linf box
    ``[max(x - eps, 0), min(x + eps, 1)]`` computed once), success is read from the logits the step's own forward
    pass produced, and without early exit nothing waits on the device between steps.
    """
    n = idx.numel()
    whole = n == ctx.n and bool(torch.equal(idx, torch.arange(n, device=idx.device)))
    x0 = ctx.x if whole else ctx.x[idx]  # never written to
    out_x: Optional[Tensor] = None  # filled lazily: without early exit the last iterate is returned as it is
    out_logits: Optional[Tensor] = None
    fooled = torch.zeros(n, dtype=torch.bool, device=x0.device)

    pos = torch.arange(n, device=x0.device)  # positions (in idx) of the samples still worked on
    ids = idx
    base = x0
    box = norm.box(x0, eps)
    if start is not None:
        cur = norm.project(start, eps).add(x0).clamp_(0.0, 1.0)
    elif random_start:
        cur = norm.random(ctx.rng, idx, x0.shape[1:], eps).to(x0).add_(x0).clamp_(0.0, 1.0)
    else:
        cur = x0.clone()  # the loop updates its iterate in place
    velocity = torch.zeros_like(x0) if momentum is not None else None

    for t in range(steps + 1):
        last = t == steps
        if last and not ctx.verify and not early_stop:  # Attack.perturb: nobody reads the final iterate's success
            return cur, None, fooled
        if last:
            logits, grad = ctx.logits(cur, ids), None
        else:
            logits, grad = _value_and_grad(ctx, cur, ids, objective, eot_samples)

        if last and out_x is None and pos.numel() == n:  # nobody left early: the last iterate is the result
            return cur, logits, ctx.is_adversarial(logits, ids)
        if early_stop or last:
            adv = ctx.is_adversarial(logits, ids)
            take = adv if not last else torch.ones_like(adv)
            if take.any():
                if out_x is None:
                    out_x = x0.clone()
                    out_logits = logits.new_empty(n, logits.shape[1])
                where = pos[take]
                out_x[where], out_logits[where], fooled[where] = cur[take], logits[take], adv[take]
            if last:
                break
            if adv.any():  # compact the state to the samples that still resist
                keep = ~adv
                pos, base, cur, grad = pos[keep], base[keep], cur[keep], grad[keep]
                box = None if box is None else (box[0][keep], box[1][keep])
                velocity = velocity[keep] if velocity is not None else None
                ids = idx[pos]
                if pos.numel() == 0:
                    break

        if velocity is not None:
            velocity = momentum * velocity + _l1_normalized(grad)
            grad = velocity.clone()  # ascend may overwrite its gradient argument
        cur = norm.ascend(cur, grad, alpha, base, eps, box)

    return out_x, out_logits, fooled


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
    start = ctx.start

    def run(ctx: Context, idx: Tensor):
        nonlocal start
        first, start = start, None  # only the first run begins at the caller's start
        return _single_run(
            ctx, idx, norm=norm, eps=eps, alpha=alpha, steps=steps, objective=objective,
            random_start=random_start, momentum=momentum, eot_samples=eot_samples, early_stop=early_stop,
            start=None if first is None else first[idx],
        )

    x_adv, logits, _ = with_restarts(ctx, torch.arange(ctx.n, device=ctx.x.device), restarts, run)
    return x_adv, logits
