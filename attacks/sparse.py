"""Shared pieces of the patch and pixel attacks: early exit for their own search loops, and exact budgets.

A :class:`WorkList` holds the result of every sample of the batch and the batch positions still being attacked.
Each round the attack hands in the samples it is done with (fooled, or out of rounds); they leave the working set,
so later rounds run on fewer samples and nothing is spent on a sample already fooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attacks.base import Attack, Context, check_int
from attacks.losses import Objective
from attacks.norms import get_norm
from attacks.params import param

#: Inputs per forward pass of the pixel attacks' candidate batches when their ``max_batch`` is None: a small CNN on a
#: CPU is fastest in cache-sized batches.
AUTO_MAX_BATCH = {"cpu": 1024, "cuda": 32768}


def set_pixels(x: Tensor, pos: Tensor, values: Tensor) -> Tensor:
    """A copy of ``x`` ``(M, C, H, W)`` with, in image ``i``, pixel ``pos[i, j]`` (an index into ``H * W``) set to
    ``values[i, j]`` (one value per channel) for every ``j``; ``pos`` is ``(M, k)``, ``values`` ``(M, k, C)``."""
    m, c, h, w = x.shape
    out = x.reshape(m, c, h * w).clone()
    out.scatter_(2, pos[:, None, :].expand(-1, c, -1), values.transpose(1, 2).to(x.dtype))
    return out.reshape(m, c, h, w)


class WorkList:
    """Per-sample results of one attack call plus ``ids``: the batch positions still being worked on."""

    def __init__(self, ctx: Context):
        self.x = ctx.x.clone()
        self.logits: Optional[Tensor] = None
        self.ids = torch.arange(ctx.n, device=ctx.x.device)

    @property
    def empty(self) -> bool:
        return self.ids.numel() == 0

    def retire(self, done: Tensor, x_done: Tensor, logits_done: Tensor) -> Tensor:
        """Store the results of the working samples flagged by ``done`` and drop them from the working set.

        Args:
            done: BoolTensor over the current working set.
            x_done, logits_done: the final input and the model's logits on it, for the flagged samples in order.

        Returns:
            ``keep``: BoolTensor over the old working set, for compacting the caller's per-sample state.
        """
        if self.logits is None:
            self.logits = logits_done.new_zeros(self.x.shape[0], logits_done.shape[1])
        where = self.ids[done]
        self.x[where] = x_done.to(self.x)
        self.logits[where] = logits_done
        keep = ~done
        self.ids = self.ids[keep]
        return keep

    def retire_fooled(self, ctx: Context, x: Tensor, logits: Tensor) -> Tensor:
        """Retire the working samples that ``x`` (one row per working sample) already fools; returns ``keep``."""
        fooled = ctx.is_adversarial(logits, self.ids)
        return self.retire(fooled, x[fooled], logits[fooled])

    def retire_all(self, x: Tensor, logits: Tensor) -> None:
        """End the attack: the remaining samples keep ``x`` (one row per working sample) as their result."""
        self.retire(torch.ones_like(self.ids, dtype=torch.bool), x, logits)

    def result(self) -> tuple[Tensor, Tensor]:
        """``(x_adv, logits)`` for the whole batch; call after :meth:`retire_all`."""
        if self.logits is None or not self.empty:
            raise RuntimeError("WorkList.result() called before every sample was retired")
        return self.x, self.logits


def keep_changes(x: Tensor, x_adv: Tensor, kept: Tensor) -> Tensor:
    """``x_adv`` where the projected perturbation ``kept`` is non-zero, else ``x``.

    Taking the values from ``x_adv`` itself (rather than computing ``x + kept``) keeps them bit-exact, so logits an
    attack computed on ``x_adv`` stay valid whenever the projection changed nothing.
    """
    return torch.where(kept.ne(0), x_adv, x)


def check_target(target: Optional[Tensor], num_classes: int) -> None:
    """Refuse target classes outside ``[0, num_classes)`` (known only once the model has answered)."""
    if target is not None and target.numel() and (target.min() < 0 or target.max() >= num_classes):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(f"target class {bad} is out of range: the model has {num_classes} classes (0-{num_classes - 1})")


def target_checked(objective: Objective) -> Objective:
    """``objective`` that first checks the target classes against the logits it is given (a clear ``ValueError``
    instead of an indexing error deep inside a loss)."""

    def checked(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        check_target(target, logits.shape[1])
        return objective(logits, y, target)

    return checked


@dataclass(frozen=True, kw_only=True)
class PixelBudget(Attack):
    """An attack that changes at most ``pixels`` pixels of each image (all channels of a pixel count as one)."""

    supported_norms = ("l0",)

    pixels: int = param(1, "Pixels changed per image at most (all channels of a pixel count as one).", fast=16)
    max_batch: Optional[int] = param(None, "Inputs per forward pass of candidate images (None: a size per device).")

    def _validate(self) -> None:
        super()._validate()
        check_int("pixels", self.pixels)
        if self.max_batch is not None:
            check_int("max_batch", self.max_batch)

    def inputs_per_pass(self, device: torch.device) -> int:
        """``max_batch`` if given, else the size that suits ``device`` (:data:`AUTO_MAX_BATCH`)."""
        return self.max_batch or AUTO_MAX_BATCH.get(device.type, AUTO_MAX_BATCH["cuda"])

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Refuse images of ``shape`` ``(C, H, W)`` that have fewer than ``pixels`` pixels (``ValueError``).

        Called at the start of every attack; callers such as the CLI may call it first to report a usage error
        before any work is done.
        """
        if len(shape) != 3:
            raise ValueError(f"pixel attacks need images of shape (C, H, W), got {tuple(shape)}")
        h, w = shape[-2], shape[-1]
        if self.pixels > h * w:
            raise ValueError(f"pixels={self.pixels} is more than the {h * w} pixels of a {h}x{w} image")

    def _enforce(self, x: Tensor, x_adv: Tensor) -> Tensor:
        x_adv = x_adv.clamp(0.0, 1.0)
        return keep_changes(x, x_adv, get_norm("l0").project(x_adv - x, self.pixels))
