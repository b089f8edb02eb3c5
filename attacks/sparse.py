"""Shared pieces of the patch and pixel attacks: pixel setting, target checks and exact budgets.

Their search loops keep the samples still attacked in a :class:`~attacks.workset.WorkSet`: each round the samples
that are done (fooled, or out of rounds) leave it, so later rounds run on fewer samples and nothing is spent on a
sample already fooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attacks.base import MAX_BATCH, Attack, check_int
from attacks.losses import Objective
from attacks.norms import get_norm
from attacks.oracle import CPU_ROWS_PER_CALL
from attacks.params import param

#: Inputs per forward pass of the pixel and patch attacks' candidate batches when their ``max_batch`` is None. On a
#: CPU this is :data:`attacks.oracle.CPU_ROWS_PER_CALL`, the size the black-box oracle uses: small CNNs run the most
#: images per second in cache-sized calls (see docs/benchmarks.md, "Query attacks against their forward floor").
AUTO_MAX_BATCH = {"cpu": CPU_ROWS_PER_CALL, "cuda": 32768}


def set_pixels(x: Tensor, pos: Tensor, values: Tensor) -> Tensor:
    """A copy of ``x`` ``(M, C, H, W)`` with, in image ``i``, pixel ``pos[i, j]`` (an index into ``H * W``) set to
    ``values[i, j]`` (one value per channel) for every ``j``; ``pos`` is ``(M, k)``, ``values`` ``(M, k, C)``."""
    return set_pixels_(x.clone(memory_format=torch.contiguous_format), pos, values)


def set_pixels_(x: Tensor, pos: Tensor, values: Tensor) -> Tensor:
    """:func:`set_pixels` in place on ``x``, which must be contiguous (e.g. a fresh copy made by indexing); returns
    ``x``. Saves the copy when the caller owns the images already."""
    if not x.is_contiguous():
        raise ValueError("set_pixels_ needs a contiguous tensor")
    m, c, h, w = x.shape
    x.view(m, c, h * w).scatter_(2, pos[:, None, :].expand(-1, c, -1), values.transpose(1, 2).to(x.dtype))
    return x


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
            check_int("max_batch", self.max_batch, high=MAX_BATCH)

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
