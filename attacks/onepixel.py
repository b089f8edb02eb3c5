"""One-pixel / k-pixel attack by differential evolution.

Su, Vargas & Sakurai, "One Pixel Attack for Fooling Deep Neural Networks", IEEE Transactions on Evolutionary
Computation 23(5), 2019. A black-box search over perturbations that change ``k`` pixels: each candidate encodes, for
each of its ``k`` pixels, a row, a column and one value per channel. The paper's settings are the defaults:
DE/rand/1 with population 400, up to 100 generations, scale ``F = 0.5`` and no crossover; coordinates start
uniform over the image and values Gaussian around mid-grey (N(128, 127) in 0-255 units); a child replaces its parent
when it lowers the true class's probability (untargeted) or raises the target's (targeted). The search stops for an
image as soon as one candidate fools the model.

Batched: the populations of all images in the batch form one tensor, so one forward pass per generation serves every
candidate of every image (split into model calls of ``max_batch`` inputs; by default a size per device chosen by
measurement, :data:`attacks.sparse.AUTO_MAX_BATCH`). Each candidate costs its image one query: at most
``1 + population * (steps + 1)`` queries per image (the first checks the clean image).

>>> OnePixel(pixels=3)(model, x, y).success.float().mean()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attacks.base import MAX_QUERIES, Context, check_int, check_range
from attacks.params import param
from attacks.registry import register
from attacks.rng import SampleRNG
from attacks.sparse import PixelBudget, check_target, set_pixels, set_pixels_
from attacks.workset import WorkSet


def perturb_pixels(x: Tensor, genes: Tensor, inplace: bool = False) -> Tensor:
    """Images ``x`` (``(M, C, H, W)``) with the pixels that ``genes`` (``(M, k, 2 + C)``) encode set: a copy, or
    ``x`` itself changed in place with ``inplace=True`` (``x`` must then be contiguous).

    A gene row is ``(row, column, value of channel 0, ..., value of channel C-1)``; coordinates are floored to
    pixel positions and must already lie inside the image, values inside [0, 1].
    """
    pos = genes[..., 0].long() * x.shape[-1] + genes[..., 1].long()
    return (set_pixels_ if inplace else set_pixels)(x, pos, genes[..., 2:])


def _three_distinct(rng: SampleRNG, ids: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each sample at ``ids`` and each of ``size`` candidates: three distinct uniform indices in ``[0, size)``.

    Shapes ``(len(ids), size)``; drawn from the samples' own random streams.
    """
    r1 = rng.integers(ids, size, (size,))
    r2 = rng.integers(ids, size - 1, (size,))
    r2 = r2 + (r2 >= r1).long()
    r3 = rng.integers(ids, size - 2, (size,))
    lo, hi = torch.minimum(r1, r2), torch.maximum(r1, r2)
    r3 = r3 + (r3 >= lo).long()
    r3 = r3 + (r3 >= hi).long()
    return r1, r2, r3


@register
@dataclass(frozen=True, kw_only=True)
class OnePixel(PixelBudget):
    """Changes at most ``pixels`` pixels (all channels of a pixel count as one)."""

    name = "onepixel"
    kind = "pixel"
    description = "k-pixel attack by differential evolution, black-box (Su et al. 2019)"

    population: int = param(400, "Candidates per image (the differential-evolution population).", fast=40)
    steps: int = param(100, "Generations after the first population, at most.", fast=10)
    mutation: float = param(0.5, "Differential-evolution scale F.")
    max_queries: Optional[int] = param(None, "Query cap per image, at least population + 1 (the clean check and one "
                                       "population); None: no cap.")

    def _validate(self) -> None:
        super()._validate()
        check_int("population", self.population, low=4)
        check_int("steps", self.steps, low=0)
        check_range("mutation", self.mutation, low=0.0, high=2.0)
        if self.max_queries is not None:
            check_int("max_queries", self.max_queries, low=self.population + 1, high=MAX_QUERIES)

    @property
    def generations(self) -> int:
        """Generations after the initial population that the query budget allows."""
        if self.max_queries is None:
            return self.steps
        return min(self.steps, (self.max_queries - 1) // self.population - 1)

    # -- the search ----------------------------------------------------------------------------------------------
    def _run(self, ctx: Context) -> tuple[Tensor, Tensor]:
        self.check_images(tuple(ctx.x.shape[1:]))
        _, _, h, w = ctx.x.shape
        work = WorkSet.batch(ctx.x)
        clean = ctx.logits(ctx.x, work.ids)
        check_target(ctx.target, clean.shape[1])
        work.retire(ctx.is_adversarial(clean, work.ids), ctx.x, clean)  # already misclassified: nothing to change
        # per image: its population of candidates, their fitness (lower is better) and their logits
        work.pop = self._initial_population(ctx, work.ids).to(ctx.x)
        work.fit, work.logits = self._evaluate(ctx, work, work.pop)
        for _ in range(self.generations):
            self._retire_fooled(ctx, work)
            if work.empty:
                break
            trial = self._mutate(work.pop, ctx.rng, work.ids, h, w)
            t_fit, t_logits = self._evaluate(ctx, work, trial)
            # a child that fools the model is kept even when its fitness is no better than its parent's
            better = (t_fit <= work.fit) | self._fooled(ctx, work, t_logits)
            work.pop = torch.where(better[..., None, None], trial, work.pop)
            work.fit = torch.where(better, t_fit, work.fit)
            work.logits = torch.where(better[..., None], t_logits, work.logits)
        self._retire_fooled(ctx, work)
        if not work.empty:
            best = work.fit.argmin(dim=1)
            rows = torch.arange(best.numel(), device=best.device)
            work.retire_all(perturb_pixels(ctx.x[work.ids], work.pop[rows, best]), work.logits[rows, best])
        return work.results.x_adv, work.results.logits

    def _initial_population(self, ctx: Context, ids: Tensor) -> Tensor:
        """``(M, population, k, 2 + C)`` for the images at ``ids``: coordinates uniform over the image, values
        ~ N(0.5, 0.5) clipped to [0, 1]."""
        _, c, h, w = ctx.x.shape
        shape = (self.population, self.pixels)
        rows = ctx.rng.uniform(ids, shape) * h
        cols = ctx.rng.uniform(ids, shape) * w
        values = (ctx.rng.normal(ids, (*shape, c)) * 0.5 + 0.5).clamp(0.0, 1.0)
        return self._clip(torch.cat([rows[..., None], cols[..., None], values], dim=-1), h, w)

    def _mutate(self, pop: Tensor, rng: SampleRNG, ids: Tensor, h: int, w: int) -> Tensor:
        """DE/rand/1 without crossover: ``child_i = x_r1 + F (x_r2 - x_r3)`` with distinct random r1, r2, r3."""
        picks = [r.to(pop.device) for r in _three_distinct(rng, ids, pop.shape[1])]
        a, b, c = (pop.gather(1, r[..., None, None].expand_as(pop)) for r in picks)
        return self._clip(a + self.mutation * (b - c), h, w)

    @staticmethod
    def _clip(genes: Tensor, h: int, w: int) -> Tensor:
        """Keep coordinates inside the image (so flooring gives a valid pixel) and values inside [0, 1]."""
        hi = torch.tensor([h, w], dtype=genes.dtype, device=genes.device) - 1e-3
        coords = torch.minimum(genes[..., :2].clamp_min(0.0), hi)
        return torch.cat([coords, genes[..., 2:].clamp(0.0, 1.0)], dim=-1)

    def _evaluate(self, ctx: Context, work: WorkSet, pop: Tensor) -> tuple[Tensor, Tensor]:
        """Fitness (lower is better) and logits of every candidate of every working image: ``(M, P)``, ``(M, P, K)``."""
        m, p = pop.shape[:2]
        owner = torch.arange(m, device=pop.device).repeat_interleave(p)
        genes = pop.flatten(0, 1)
        chunk = self.inputs_per_pass(ctx.x.device)
        parts = []
        for s in range(0, genes.shape[0], chunk):
            o = owner[s:s + chunk]
            rows = work.ids[o]
            # indexing makes a fresh copy of the images: the candidates' pixels are set in it directly
            parts.append(ctx.logits(perturb_pixels(ctx.x[rows].contiguous(), genes[s:s + chunk], inplace=True), rows))
        logits = torch.cat(parts).view(m, p, -1)
        probs = logits.softmax(dim=-1)
        y, t = ctx.label_of(work.ids)
        cls = y if t is None else t
        p_cls = probs.gather(2, cls[:, None, None].expand(-1, p, 1))[..., 0]
        return (p_cls if t is None else -p_cls), logits

    @staticmethod
    def _fooled(ctx: Context, work: WorkSet, logits: Tensor) -> Tensor:
        """``(M, P)``: whether each candidate (logits ``(M, P, K)``) of each working image meets the goal."""
        m, p = logits.shape[:2]
        return ctx.is_adversarial(logits.flatten(0, 1), work.ids.repeat_interleave(p)).view(m, p)

    def _retire_fooled(self, ctx: Context, work: WorkSet) -> None:
        """Retire the images one of whose candidates fools the model (the fittest fooling one is their result)."""
        adv = self._fooled(ctx, work, work.logits)
        done = adv.any(dim=1)
        if done.any():
            pick = torch.where(adv, work.fit, torch.full_like(work.fit, float("inf"))).argmin(dim=1)[done]
            rows = done.nonzero().squeeze(1)
            work.record(done, perturb_pixels(ctx.x[work.ids[rows]], work.pop[rows, pick]), work.logits[rows, pick])
            work.keep(~done)
