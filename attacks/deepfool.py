"""DeepFool — the minimal step to the nearest linearized decision boundary.

Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool deep neural networks",
CVPR 2016. At each step the classifier is linearized around the current point; the perturbation moves to the
closest of the (linearized) boundaries between the original class and the ``candidates`` most likely other
classes. The total perturbation is scaled by ``1 + overshoot`` to cross the boundary. Paper defaults: 50 steps,
overshoot 0.02, 10 candidate classes. L2 (paper's main variant) and Linf; any norm with a dual works: the distance
to the boundary ``f + <w, r> = 0`` is ``|f| / ||w||_q`` in the dual norm ``q``, and the step there is the paper's
``|f| / ||w||_q^q * |w|^(q-1) * sign(w)``.

Untargeted only. A minimum-norm attack: with ``eps`` set, perturbations larger than it do not count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import MinNormAttack, check_int, check_range
from attacks.params import param
from attacks.registry import register


@register
@dataclass(frozen=True, kw_only=True)
class DeepFool(MinNormAttack):
    name = "deepfool"
    supported_norms = ("l2", "linf")
    targeted_ok = False
    description = "DeepFool: iterative step to the nearest linearized boundary, minimal L2/Linf (Moosavi-Dezfooli 2016)"

    steps: int = param(50, "Linearization steps at most.", fast=10)
    overshoot: float = param(0.02, "The total perturbation is scaled by 1 + overshoot to cross the boundary.")
    candidates: int = param(10, "Classes whose boundaries are considered: the original and the candidates - 1 "
                                "most likely others (>= 2).")

    def _validate(self) -> None:
        super()._validate()
        check_int("steps", self.steps)
        check_range("overshoot", self.overshoot, low=0.0, low_inclusive=True)
        check_int("candidates", self.candidates, low=2)

    def _run(self, ctx):
        x, y = ctx.x, ctx.y
        dual = self.norm_obj.dual  # measures the distance to a hyperplane
        q = dual.p
        r_total = torch.zeros_like(x)
        out_x = x.clone()
        active = torch.arange(ctx.n, device=x.device)
        cand = None
        for _ in range(self.steps + 1):
            xa = (x[active] + (1 + self.overshoot) * r_total[active]).clamp(0.0, 1.0)
            xg = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = ctx.forward_graph(xg, active)
                if cand is None:  # the original class first, then the likeliest others
                    order = logits.detach().argsort(dim=1, descending=True)
                    others = order[order != y[:, None]].reshape(ctx.n, -1)
                    cand = torch.cat([y[:, None], others[:, : self.candidates - 1]], dim=1)
                fooled = logits.argmax(dim=1) != y[active]
                out_x[active[fooled]] = xa[fooled].detach()
                keep = ~fooled
                if not keep.any():
                    break
                if _ == self.steps:
                    out_x[active[keep]] = xa[keep].detach()
                    break
                z = logits.gather(1, cand[active])  # (n, candidates): z_orig first
                grads = [torch.autograd.grad(z[:, k].sum(), xg, retain_graph=k < z.shape[1] - 1)[0]
                         for k in range(z.shape[1])]
            ctx.charge_gradients(active, z.shape[1])
            g0 = grads[0]
            w = torch.stack([g - g0 for g in grads[1:]], dim=1)[keep]  # (n, candidates-1, C, H, W)
            f = (z[:, 1:] - z[:, :1]).detach()[keep]
            wn = dual.measure(w.flatten(0, 1)).reshape(w.shape[:2])
            dist = f.abs() / (wn + 1e-8)
            best = dist.argmin(dim=1)
            rows = torch.arange(best.numel(), device=x.device)
            w_l, f_l, wn_l = w[rows, best], f[rows, best].abs(), wn[rows, best]
            shape = (-1,) + (1,) * (x.dim() - 1)
            step = ((f_l + 1e-4) / (wn_l ** q + 1e-8)).reshape(shape) * (w_l.abs() ** (q - 1) * w_l.sign())
            active = active[keep]
            r_total[active] += step
        return out_x, None
