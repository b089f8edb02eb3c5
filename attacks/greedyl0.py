"""Greedy L0 — a gradient-guided sparse white-box attack (JSMA-style).

After Papernot, McDaniel, Jha, Fredrikson, Celik & Swami, "The Limitations of Deep Learning in Adversarial
Settings", IEEE EuroS&P 2016 (the Jacobian-based Saliency Map Attack). Like JSMA it changes one input location at a
time, picked by a first-order saliency score, and drives it to an extreme of the box. Unlike the original it scores
whole pixels (all channels of a location together), may push each channel up *or* down, ranks pixels by the
first-order gain of the margin loss ``sum_c grad_c * (extreme_c - x_c)`` instead of a pair-wise saliency map, and
needs one backward pass per changed pixel whatever the number of classes. It stops for a sample as soon as it is
fooled, so ``res.norms`` is the number of pixels that sample needed (at most ``pixels``).

>>> GreedyL0(pixels=5)(model, x, y).norms     # pixels changed per image
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attacks.base import Context, check_choice
from attacks.losses import LOSSES, get_loss
from attacks.registry import register
from attacks.sparse import PixelBudget, WorkList, target_checked


def saturate_best_pixel(cur: Tensor, x0: Tensor, grad: Tensor) -> Tensor:
    """Set, in each image, the not-yet-changed pixel with the largest first-order gain to its best box extreme.

    All tensors are ``(M, C, H, W)``; ``grad`` is the gradient of the loss being maximized at ``cur``.
    """
    m, c, h, w = cur.shape
    extreme = (grad > 0).to(cur.dtype)
    gain = (grad * (extreme - cur)).sum(dim=1).reshape(m, h * w)
    changed = cur.ne(x0).any(dim=1).reshape(m, h * w)
    gain = gain.masked_fill(changed, float("-inf"))
    best = gain.argmax(dim=1)
    out = cur.reshape(m, c, h * w).clone()
    idx = best[:, None, None].expand(-1, c, 1)
    out.scatter_(2, idx, extreme.reshape(m, c, h * w).gather(2, idx))
    return out.reshape(m, c, h, w)


@register
@dataclass(frozen=True, kw_only=True)
class GreedyL0(PixelBudget):
    """Changes at most ``pixels`` pixels, one per gradient step; ``loss``: ``margin`` (default), ``ce`` or ``dlr``."""

    name = "greedyl0"
    kind = "white-box"
    description = "Greedy gradient-guided L0 attack: saturates the most salient pixel per step (JSMA-style)"

    pixels: int = 10
    loss: str = "margin"

    def _validate(self) -> None:
        super()._validate()
        check_choice("loss", self.loss, LOSSES)

    def _run(self, ctx: Context) -> tuple[Tensor, Tensor]:
        self.check_images(tuple(ctx.x.shape[1:]))
        objective = target_checked(get_loss(self.loss))
        work = WorkList(ctx)
        cur = ctx.x
        for step in range(self.pixels + 1):
            if step == self.pixels:  # budget spent: one last look, no gradient needed
                work.retire_all(cur, ctx.logits(cur, work.ids))
                break
            logits, _, grad = ctx.value_and_grad(cur, work.ids, objective)
            x0 = ctx.x[work.ids]
            keep = work.retire_fooled(ctx, cur, logits)
            if work.empty:
                break
            cur = saturate_best_pixel(cur[keep], x0[keep], grad[keep])
        return work.result()
