"""Rectangles on the image grid: the patch shapes an area budget allows, and windows of a given shape.

Patch attacks (:mod:`attacks.patch`) and the patch-area norm (:class:`attacks.norms.PatchArea`) place their
footprints with these. ``area`` is a fraction of the image's ``height * width`` pixels; windows are given by the
top-left corners ``(rows, cols)`` of each image's rectangle.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def patch_shape(area: float, height: int, width: int) -> tuple[int, int]:
    """Rows and columns of the largest near-square patch (``a x a`` or ``a x (a+1)``) of at most ``area`` of the image.

    ``area`` is a fraction of the image's ``height * width`` pixels, so the budget is an upper bound: on a 28x28
    image 1 % gives 2x3 pixels (0.77 %), 2 % gives 3x4 (1.53 %), 5 % gives 6x6 (4.59 %), 10 % gives 8x9 (9.18 %).
    """
    if not 0.0 < area < 1.0:
        raise ValueError(f"area must be a fraction of the image in (0, 1), got {area}")
    budget = area * height * width
    a = math.isqrt(int(budget + 1e-9))
    if a < 1:
        raise ValueError(
            f"area {area} of a {height}x{width} image is less than one pixel: use a larger area"
        )
    b = a + 1 if a * (a + 1) <= budget + 1e-9 else a
    return min(a, height), min(b, width)


#: Longest side over shortest side of the patch shapes :func:`patch_shapes` offers: 13x3 at 5 % of a 28x28 image
#: is in (4.3), a 2x19 line is not (9.5).
MAX_ASPECT = 5.0


def patch_shapes(area: float, height: int, width: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """Every rectangle a patch of at most ``area`` of the image can take, with neither side more than ``max_aspect``
    times the other, that lies inside no other such rectangle; ordered by rows.

    On a 28x28 image 5 % (39.2 pixels) gives 3x13, 4x9, 5x7, 6x6, 7x5, 9x4 and 13x3; 2 % (15.7 pixels) gives 2x7,
    3x5, 5x3 and 7x2 (the near-square :func:`patch_shape`, 3x4, is inside 3x5).
    """
    patch_shape(area, height, width)  # the same checks and messages
    budget = area * height * width + 1e-9

    def widest(a: int) -> int:  # the most columns a rows may have (0: none fits)
        b = min(width, int(budget // a), int(max_aspect * a + 1e-9))
        return b if b >= 1 and a <= max_aspect * b + 1e-9 else 0

    cols = [widest(a) for a in range(1, height + 1)]
    return [(a, b) for a, b in enumerate(cols, start=1) if b and all(c < b for c in cols[a:])]


def window_mask(rows: Tensor, cols: Tensor, shape: tuple[int, int], height: int, width: int) -> Tensor:
    """Boolean ``(N, 1, height, width)`` masks of ``shape``-sized windows whose top-left corners are ``(rows, cols)``."""
    a, b = shape
    r = torch.arange(height, device=rows.device)
    c = torch.arange(width, device=cols.device)
    in_r = (r >= rows[:, None]) & (r < rows[:, None] + a)
    in_c = (c >= cols[:, None]) & (c < cols[:, None] + b)
    return (in_r[:, :, None] & in_c[:, None, :])[:, None]


def best_window(weight: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Top-left corners ``(rows, cols)`` of the ``shape`` window with the largest sum of ``weight`` ``(N, 1, H, W)``."""
    rows, cols = ranked_windows(weight, shape, 1)
    return rows[0], cols[0]


def ranked_windows(weight: Tensor, shape: tuple[int, int], count: int) -> tuple[Tensor, Tensor]:
    """Top-left corners ``(rows, cols)``, each ``(count, N)``, of ``count`` non-overlapping ``shape`` windows per
    image, in decreasing order of their sum of ``weight`` ``(N, 1, H, W)`` (greedy non-maximum suppression).

    When fewer than ``count`` disjoint windows fit, the last ones may overlap earlier ones.
    """
    a, b = shape
    sums = torch.nn.functional.avg_pool2d(weight, (a, b), stride=1, divisor_override=1)[:, 0]  # (N, R, C)
    n, r_count, c_count = sums.shape
    rr = torch.arange(r_count, device=weight.device)[None, :, None]
    cc = torch.arange(c_count, device=weight.device)[None, None, :]
    rows, cols = [], []
    for _ in range(count):
        best = sums.reshape(n, -1).argmax(dim=1)
        r, c = best // c_count, best % c_count
        rows.append(r)
        cols.append(c)
        overlap = ((rr - r[:, None, None]).abs() < a) & ((cc - c[:, None, None]).abs() < b)
        sums = sums.masked_fill(overlap, float("-inf"))
    return torch.stack(rows), torch.stack(cols)
