"""Adversarial patches: a visible rectangle pasted on the image, budgeted by its area.

* Universal patch — Brown, Mané, Roy, Abadi & Gilmer, "Adversarial Patch", arXiv:1712.09665, 2017. One patch,
  trained over many images with Expectation Over Transformation (a random location, scale and rotation per image,
  so it works wherever it lands), then pasted on unseen images at random locations. Training is a library function,
  :func:`train_patch`; :class:`UniversalPatch` applies a patch (and, given none, trains one on the batch it attacks).
* Localized per-image patch — Karmon, Zoran & Goldberg, "LaVAN: Localized and Visible Adversarial Noise", ICML
  2018. A patch optimized for each image by signed-gradient steps, at a chosen or searched location
  (:class:`LocalizedPatch`).

The budget ``area`` is a fraction of the image, and the footprint is a rectangle of whole pixels within it. The
attacks' own footprint is the largest near-square one (:func:`attacks.geometry.patch_shape`: 5 % of a 28x28 image is
6x6 pixels); :func:`train_patch` by default tries every rectangle the budget allows (sides at most 1:5,
:func:`attacks.geometry.patch_shapes`) and keeps the one whose short trial fools the most training images, since the
threat model fixes the area, not the shape. Both attacks change nothing outside the footprint (``_enforce``
guarantees it) and report the footprint's area in ``res.norms``.

>>> patch = train_patch(model, train_images, area=0.05)           # e.g. (C, 13, 3) on 28x28 images
>>> UniversalPatch(patch=patch)(model, x_test, y_test).success.float().mean()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import MAX_BATCH, MAX_RESTARTS, Attack, Context, check_choice, check_int, check_range
from attacks.geometry import patch_shape, patch_shapes, ranked_windows, window_mask
from attacks.losses import LOSSES, Objective, get_loss
from attacks.norms import get_norm
from attacks.params import param
from attacks.registry import register
from attacks.rng import SampleRNG
from attacks.greedyl0 import corner_proposals
from attacks.sparse import AUTO_MAX_BATCH, check_target, keep_changes, set_pixels, target_checked
from attacks.workset import WorkSet

#: Area budget used when a patch attack is built without one: 5 % of the image.
DEFAULT_AREA = 0.05


# -- patches as tensors ------------------------------------------------------------------------------------------------
def check_patch(patch: object, image_shape: Optional[tuple[int, int, int]] = None) -> Tensor:
    """Validate a patch: a floating-point tensor ``(C, h, w)`` of finite values in [0, 1]; returns it.

    With ``image_shape = (C, H, W)`` also check that the channels match and that the patch covers less than the
    whole image. Raises ``ValueError`` with one clear message otherwise.
    """
    if not isinstance(patch, Tensor):
        raise ValueError(f"a patch must be a tensor of shape (C, h, w), got {type(patch).__name__}")
    if patch.dim() != 3 or patch.shape[0] not in (1, 3) or min(patch.shape[1:]) < 1:
        raise ValueError(f"a patch must have shape (C, h, w) with 1 or 3 channels, got {tuple(patch.shape)}")
    if not patch.is_floating_point():
        raise ValueError(f"a patch must hold floating-point values in [0, 1], got {patch.dtype}")
    if not torch.isfinite(patch).all() or patch.min() < 0 or patch.max() > 1:
        raise ValueError("a patch must hold finite values in [0, 1]")
    if image_shape is not None:
        c, h, w = image_shape
        pc, ph, pw = patch.shape
        if pc != c:
            raise ValueError(f"the patch has {pc} channel(s) but the images have {c}")
        if ph > h or pw > w or ph * pw >= h * w:
            raise ValueError(f"a {ph}x{pw} patch does not fit inside (and smaller than) a {h}x{w} image")
    return patch


def noise_patch(shape: tuple[int, int, int], generator: torch.Generator) -> Tensor:
    """A control patch of uniform random values, ``shape = (C, h, w)``, on the generator's device."""
    return torch.rand(shape, generator=generator, device=generator.device)


def random_corners(rng: SampleRNG, ids: Tensor, shape: tuple[int, int], height: int, width: int):
    """Top-left corners ``(rows, cols)`` of ``shape`` windows for the samples at ``ids``, uniform over the positions
    inside the image, each from its sample's own random stream."""
    a, b = shape
    return rng.integers(ids, height - a + 1), rng.integers(ids, width - b + 1)


def paste(x: Tensor, patch: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``x`` ``(N, C, H, W)`` with ``patch`` ``(C, a, b)`` (or one patch per image, ``(N, C, a, b)``) pasted with its
    top-left corner at ``(rows[i], cols[i])``. Exact (no interpolation) and differentiable in the patch."""
    n, c, h, w = x.shape
    a, b = patch.shape[-2:]
    rows, cols = rows.to(x.device), cols.to(x.device)
    mask = window_mask(rows, cols, (a, b), h, w)
    pr = (torch.arange(h, device=x.device) - rows[:, None]).clamp(0, a - 1)  # (N, H): patch row under image row
    pc = (torch.arange(w, device=x.device) - cols[:, None]).clamp(0, b - 1)
    per_image = patch.to(x).expand(n, c, a, b)
    canvas = per_image.gather(2, pr[:, None, :, None].expand(n, c, h, b))
    canvas = canvas.gather(3, pc[:, None, None, :].expand(n, c, h, w))
    return torch.where(mask, canvas, x)


def eot_paste(x: Tensor, patch: Tensor, draws: Tensor, *, min_scale: float, rotation: float) -> Tensor:
    """Paste ``patch`` on every image under its own random transformation (differentiable in the patch).

    ``draws`` ``(N, 4)`` are uniform numbers in [0, 1) per image: they pick a scale in ``[min_scale, 1]`` of the
    patch's side, a rotation in ``[-rotation, rotation]`` degrees and a location where the whole transformed patch
    lies inside the image; the patch is resampled bilinearly (Brown et al.'s Expectation Over Transformation).
    """
    n, c, h, w = x.shape
    a, b = patch.shape[-2:]
    u = draws.to(x).T
    scale = min_scale + (1.0 - min_scale) * u[0]
    angle = (2 * u[1] - 1) * math.radians(rotation)
    cos, sin = angle.cos(), angle.sin()
    half_w = 0.5 * scale * (b * cos.abs() + a * sin.abs())  # half extents of the transformed patch, in pixels
    half_h = 0.5 * scale * (b * sin.abs() + a * cos.abs())
    cx = half_w + u[2] * (w - 2 * half_w).clamp_min(0)  # centre, in pixel coordinates
    cy = half_h + u[3] * (h - 2 * half_h).clamp_min(0)
    # affine map from output coordinates in [-1, 1] to patch coordinates in [-1, 1] (align_corners=False)
    sx, sy = 0.5 * scale * b, 0.5 * scale * a
    ox, oy = w / 2 - cx, h / 2 - cy
    theta = torch.stack([
        torch.stack([cos * w / 2 / sx, sin * h / 2 / sx, (cos * ox + sin * oy) / sx], dim=1),
        torch.stack([-sin * w / 2 / sy, cos * h / 2 / sy, (-sin * ox + cos * oy) / sy], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    warped = F.grid_sample(patch.to(x).expand(n, c, a, b), grid, align_corners=False)
    alpha = F.grid_sample(x.new_ones(n, 1, a, b), grid, align_corners=False)
    return x * (1 - alpha) + warped


# -- training a universal patch ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PatchTraining:
    """How a universal patch is trained: ``steps`` Adam steps of size ``lr`` (cosine-decayed to 0) on minibatches
    of ``batch_size`` images (all of them when None), each image under its own random scale in ``[min_scale, 1]``,
    rotation in ``[-rotation, rotation]`` degrees and location; ``loss`` is maximized (untargeted) or the target's
    raised.

    ``kappa``: each image's loss is capped at ``kappa`` (None: no cap), so an image the patch already fools by a
    wide margin stops pulling it and the gradient goes to the images not yet fooled (the confidence cap of Carlini &
    Wagner's loss). With the default ``margin`` loss that is a logit margin of 5.

    ``sink`` (untargeted only): instead of pushing each image away from its own class, which pulls a shared patch
    in as many directions as there are classes, pull every image towards one *sink* class, the one whose short
    trial (``trial_steps`` steps for each class, and one of the plain untargeted loss) fools the most training
    images; images of that class are left out of its loss. The patch with the best trial continues training.
    Brown et al.'s strongest patches are targeted ones for the same reason. When several patch shapes are asked
    for (:func:`train_patch`'s ``shape="auto"``), every shape gets the same trials and the best (shape, objective)
    pair continues.

    ``refine``: sweeps of a discrete search after the gradient steps. The gradient steps end in a patch whose pixels
    sit at black or white (the corners of the colour cube), where a first-order method stalls. Each sweep takes the
    next ``refine_images`` training images, each pasted at a random place (how :class:`UniversalPatch` applies a
    patch), ranks the one-pixel moves to the corner the gradient points to, or the opposite corner, by their
    first-order gain there (the proposals of :class:`attacks.GreedyL0`), tries the ``refine_candidates`` best, and
    keeps the one that fools the most of those images (ties: the largest mean objective) if it fools more than the
    current patch.
    """

    steps: int = 1000
    lr: float = 0.05
    batch_size: Optional[int] = 256
    min_scale: float = 0.8
    rotation: float = 20.0
    loss: str = "margin"
    kappa: Optional[float] = 5.0
    sink: bool = True
    trial_steps: int = 40
    refine: int = 20
    refine_candidates: int = 64
    refine_images: int = 2048

    def __post_init__(self) -> None:
        check_int("steps", self.steps)
        check_range("lr", self.lr, low=0.0)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, high=MAX_BATCH)
        check_range("min_scale", self.min_scale, low=0.0, high=1.0)
        check_range("rotation", self.rotation, low=0.0, high=180.0, low_inclusive=True)
        check_choice("loss", self.loss, LOSSES)
        if self.kappa is not None:
            check_range("kappa", self.kappa, low=0.0)
        check_int("trial_steps", self.trial_steps)
        check_int("refine", self.refine, low=0)
        check_int("refine_candidates", self.refine_candidates)
        check_int("refine_images", self.refine_images)


#: Training images a sink trial is scored on (the first ones of the training set, at random locations).
_TRIAL_IMAGES = 1000


#: How a patch lands on images: ``place(x, patch)`` pastes ``patch`` (one ``(C, a, b)``, or one per image) on ``x``.
Placement = Callable[[Tensor, Tensor], Tensor]


def _patch_grad(ctx: Context, idx: Tensor, patch: Tensor, place: Placement, objective: Objective) -> Tensor:
    """Gradient of ``objective`` summed over the samples at ``idx``, with ``patch`` placed on them by ``place``,
    with respect to ``patch``: the model's input gradient on the patched images carried back through the pasting."""
    patch = patch.detach().requires_grad_(True)
    with torch.enable_grad():
        patched = place(ctx.x[idx], patch)
        _, _, grad_x = ctx.value_and_grad(patched.detach(), idx, objective)
        (grad,) = torch.autograd.grad(patched, patch, grad_outputs=grad_x)
    return grad


def _optimize(ctx: Context, patch: Tensor, training: PatchTraining, objective: Objective, steps: int) -> Tensor:
    """``steps`` Adam steps on a copy of ``patch`` ``(C, a, b)``, maximizing ``objective`` under EOT; returns it."""
    patch = patch.clone().requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=training.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # settle instead of bouncing off the box
    everyone = torch.arange(ctx.n, device=ctx.x.device)
    size = min(training.batch_size or ctx.n, ctx.n)
    for _ in range(steps):
        # a random minibatch: the `size` samples whose own streams drew the smallest numbers this step
        idx = everyone if size == ctx.n else ctx.rng.uniform(everyone, ()).argsort()[:size].to(everyone)
        draws = ctx.rng.uniform(idx, (4,))
        place = partial(eot_paste, draws=draws, min_scale=training.min_scale, rotation=training.rotation)
        patch.grad = -_patch_grad(ctx, idx, patch, place, objective)  # Adam minimizes
        opt.step()
        schedule.step()
        with torch.no_grad():
            patch.clamp_(0.0, 1.0)
    return patch.detach()


def _capped(objective: Objective, kappa: Optional[float]) -> Objective:
    """``objective`` capped at ``kappa`` per sample (unchanged when ``kappa`` is None)."""
    if kappa is None:
        return objective

    def capped(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        return objective(logits, y, target).clamp(max=kappa)

    return capped


def _sink_objective(loss: Objective) -> Objective:
    """``loss`` towards the sink class (passed as the target), zero for the images that already belong to it."""

    def objective(logits: Tensor, y: Tensor, sink: Optional[Tensor]) -> Tensor:
        value = loss(logits, y, sink)
        return torch.where(y == sink, torch.zeros_like(value), value)

    return objective


def _fooling_rate(ctx: Context, patch: Tensor) -> float:
    """Success of ``patch`` (the goal of ``ctx``: untargeted or towards its target) pasted at random locations on
    the first training images (counted passes)."""
    _, _, h, w = ctx.x.shape
    idx = torch.arange(min(ctx.n, _TRIAL_IMAGES), device=ctx.x.device)
    rows, cols = random_corners(ctx.rng, idx, tuple(patch.shape[-2:]), h, w)
    logits = ctx.logits(paste(ctx.x[idx], patch, rows, cols), idx)
    return ctx.is_adversarial(logits, idx).float().mean().item()


def _scores(ctx: Context, idx: Tensor, rows: Tensor, cols: Tensor, patches: Tensor, objective: Objective) -> Tensor:
    """Per candidate of ``patches`` ``(K, C, a, b)``: how many samples at ``idx`` it fools pasted with its corner at
    ``(rows, cols)``, plus less than 0.5 for its mean objective (a tie-break that never outweighs one more fooled
    image). Every pass is counted; candidates go to the model in groups of about
    :data:`attacks.sparse.AUTO_MAX_BATCH` rows."""
    m = idx.numel()
    per_call = AUTO_MAX_BATCH.get(ctx.x.device.type, AUTO_MAX_BATCH["cuda"])
    x, out = ctx.x[idx], []
    for group in patches.split(max(1, per_call // m)):
        g = group.shape[0]
        ids = idx.repeat(g)
        logits = ctx.logits(paste(x.repeat(g, 1, 1, 1), group.repeat_interleave(m, dim=0), rows.repeat(g),
                                  cols.repeat(g)), ids)
        y, t = ctx.label_of(ids)
        fooled = ctx.is_adversarial(logits, ids).view(g, m).sum(dim=1)
        tie = 0.49 * torch.tanh(objective(logits, y, t)).view(g, m).mean(dim=1)
        out.append(fooled + tie)
    return torch.cat(out)


def _refine(ctx: Context, patch: Tensor, training: PatchTraining, objective: Objective) -> Tensor:
    """The discrete search of :class:`PatchTraining` (``refine`` sweeps) from ``patch`` ``(C, a, b)``.

    Sweep ``s`` works on the next ``refine_images`` images of ``ctx`` (cycling through them), each at a random
    place drawn for that sweep, and there scores the current patch beside its candidates: a move is kept only if it
    fools more of that sweep's images. Fresh images and places every sweep keep the search from fitting one sample
    of placements (with one fixed set, its own fooled share rose 1.9 points in ten sweeps, held-out images' 0.7).
    """
    _, _, h, w = ctx.x.shape
    m = min(ctx.n, training.refine_images)
    for sweep in range(training.refine):
        idx = (torch.arange(m, device=ctx.x.device) + sweep * m) % ctx.n
        rows, cols = random_corners(ctx.rng, idx, tuple(patch.shape[-2:]), h, w)
        grad = _patch_grad(ctx, idx, patch, partial(paste, rows=rows, cols=cols), objective)
        # the patch's own image: every pixel may move, to the corner its gradient points to or the opposite one
        pos, values, valid = corner_proposals(patch[None], patch[None], grad[None], training.refine_candidates)
        pos, values = pos[valid], values[valid]  # (K,), (K, C)
        moved = set_pixels(patch[None].expand(pos.numel(), -1, -1, -1), pos[:, None], values[:, None])
        cands = torch.cat([patch[None], moved])  # the current patch first
        scores = _scores(ctx, idx, rows, cols, cands, objective)
        top = int(scores[1:].argmax()) + 1
        if scores[top] > scores[0]:
            patch = cands[top]
    return patch


def fit_patch(ctx: Context, shapes: Sequence[tuple[int, int]], training: PatchTraining) -> Tensor:
    """Train one patch over the images of ``ctx`` (every pass counted there); returns ``(C, a, b)`` with ``(a, b)``
    one of ``shapes``.

    Each patch starts mid-grey. The model is reached only through ``ctx``: its input gradient on the patched images
    is carried back to the patch through the (differentiable) pasting. Random draws come from the samples' streams.
    With several shapes, or untargeted with ``training.sink``, short trials pick the shape and the objective first
    (see :func:`_trials`); the gradient steps are followed by ``training.refine`` sweeps of discrete search (see
    :class:`PatchTraining`).
    """
    if not shapes:
        raise ValueError("fit_patch needs at least one patch shape")
    greys = [torch.full((ctx.x.shape[1], *shape), 0.5, dtype=ctx.x.dtype, device=ctx.x.device) for shape in shapes]
    plain = _capped(target_checked(get_loss(training.loss)), training.kappa)
    aims = [(ctx, plain)]
    if not ctx.targeted and training.sink:
        aims += _sink_aims(ctx, training)
    if len(greys) == 1 and len(aims) == 1:
        view, objective, patch = ctx, plain, greys[0]
    else:
        view, objective, patch = _trials(ctx, greys, aims, training)
    patch = _optimize(view, patch, training, objective, training.steps)
    return _refine(view, patch, training, objective) if training.refine else patch


def _sink_aims(ctx: Context, training: PatchTraining) -> list[tuple[Context, Objective]]:
    """One (view, objective) per class: every image pulled towards that class (its own images left out). The number
    of classes comes from one counted forward pass of the first image."""
    sink = _capped(_sink_objective(get_loss(training.loss)), training.kappa)
    classes = ctx.logits(ctx.x[:1], torch.zeros(1, dtype=torch.long, device=ctx.x.device)).shape[1]
    return [(ctx.retarget(torch.full_like(ctx.y, k)), sink) for k in range(classes)]


def _trials(ctx: Context, greys: list[Tensor], aims: list[tuple[Context, Objective]], training: PatchTraining):
    """A short trial (``training.trial_steps`` steps, never more than ``training.steps``) of every starting patch in
    ``greys`` (one per shape) under every (view, objective) in ``aims``; returns the view, objective and trial patch
    that fool the most of the first training images (the first one on ties), for the full training to go on from."""
    best = None
    for grey in greys:
        for view, objective in aims:
            patch = _optimize(view, grey, training, objective, min(training.trial_steps, training.steps))
            rate = _fooling_rate(ctx, patch)
            if best is None or rate > best[0]:
                best = (rate, view, objective, patch)
    return best[1:]


#: A patch's rectangle when training one: ``"auto"``, ``"square"`` or ``(rows, cols)`` (see :func:`patch_footprints`).
Shape = Union[str, tuple[int, int]]
SHAPES = ("auto", "square")


def patch_footprints(shape: Shape, area: float, height: int, width: int) -> list[tuple[int, int]]:
    """The rectangles a patch of at most ``area`` of a ``height x width`` image is trained in, for ``shape``:

    * ``"auto"``: every shape of :func:`attacks.geometry.patch_shapes` (on 28x28 at 5 %: 3x13, 4x9, 5x7, 6x6, 7x5,
      9x4, 13x3), each a short trial; the budget is the area, and the attacker picks the rectangle. On a normally
      trained Fashion-MNIST CNN a 13x3 strip fools far more images than the 6x6 square;
    * ``"square"``: the near-square :func:`attacks.geometry.patch_shape` alone (6x6 at 5 %);
    * ``(rows, cols)``: that rectangle, which must fit inside the image and within the budget.

    Raises ``ValueError`` with one clear message otherwise.
    """
    if isinstance(shape, str):
        check_choice("shape", shape, SHAPES)
        square = [patch_shape(area, height, width)]
        return (patch_shapes(area, height, width) or square) if shape == "auto" else square
    patch_shape(area, height, width)  # the area's own checks
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
        raise ValueError(f"shape must be 'auto', 'square' or (rows, cols), got {shape!r}")
    a, b = shape
    if not (1 <= a <= height and 1 <= b <= width):
        raise ValueError(f"a {a}x{b} patch does not fit inside a {height}x{width} image")
    check_within_area((a, b), area, height, width)
    return [(a, b)]


def check_within_area(shape: tuple[int, int], area: float, height: int, width: int) -> None:
    """Refuse (``ValueError``) a ``shape = (rows, cols)`` patch covering more than ``area`` of a ``height x width``
    image."""
    a, b = shape
    if a * b > area * height * width + 1e-9:
        raise ValueError(f"a {a}x{b} patch covers {a * b / (height * width):.2%} of a {height}x{width} image, "
                         f"more than area={area}")


def train_patch(
    model: nn.Module,
    images: Tensor,
    labels: Optional[Tensor] = None,
    *,
    area: float = DEFAULT_AREA,
    shape: Shape = "auto",
    target: Optional[int] = None,
    training: PatchTraining = PatchTraining(),
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Train a universal patch of at most ``area`` (fraction of the image) on ``images`` ``(N, C, H, W)`` in [0, 1].

    Untargeted (``target=None``) the patch pushes images away from ``labels`` (the model's own predictions when
    None); targeted it pulls every image towards class ``target``. ``shape`` is the patch's rectangle (see
    :func:`patch_footprints`): ``"auto"`` tries every shape of :func:`attacks.geometry.patch_shapes` and keeps the one
    whose short trial fools the most training images, ``"square"`` is :func:`attacks.geometry.patch_shape`, a pair
    ``(rows, cols)`` is that rectangle. Returns the patch ``(C, a, b)`` on the images' device. The model is left as
    it was.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (N, C, H, W), got {tuple(images.shape)}")
    shapes = patch_footprints(shape, area, images.shape[-2], images.shape[-1])
    if labels is None:
        with torch.no_grad():
            labels = torch.cat([model(chunk).argmax(dim=1) for chunk in images.split(1024)])
    tgt = None
    if target is not None:
        check_int("target", target, low=0)
        tgt = torch.full((images.shape[0],), target, dtype=torch.long, device=images.device)
    gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(0)
    rng = SampleRNG.from_generator(gen, images.shape[0], images.device)
    return fit_patch(Context(model, images, labels.to(images.device).long(), tgt, rng), shapes, training)


# -- the attacks ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PatchAttack(Attack):
    """Shared budget of the patch attacks: changes only inside one rectangle; ``res.norms`` is its area fraction."""

    kind = "patch"
    supported_norms = ("area",)

    def footprint(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Rows and columns of the patch on images of ``shape`` ``(C, H, W)``; ``ValueError`` if none fits."""
        raise NotImplementedError

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Refuse images of ``shape`` ``(C, H, W)`` the patch cannot be applied to (``ValueError``).

        Called at the start of every attack; callers such as the CLI may call it first to report a usage error
        before any work is done.
        """
        if len(shape) != 3:
            raise ValueError(f"patch attacks need images of shape (C, H, W), got {tuple(shape)}")
        self.footprint(shape)

    def _enforce(self, x: Tensor, x_adv: Tensor) -> Tensor:
        x_adv = x_adv.clamp(0.0, 1.0)
        return keep_changes(x, x_adv, get_norm("area").project_window(x_adv - x, self.footprint(x.shape[1:])))

    def _measure(self, x: Tensor, x_adv: Tensor) -> Tensor:
        a, b = self.footprint(x.shape[1:])
        return torch.full((x.shape[0],), a * b / (x.shape[-2] * x.shape[-1]), device=x.device)


@register
@dataclass(frozen=True, kw_only=True)
class UniversalPatch(PatchAttack):
    """Pastes one patch on every image at a random location (drawn from the generator).

    ``patch``: a ``(C, h, w)`` tensor in [0, 1] (see :func:`check_patch`); its own size is the budget, which must not
    exceed ``area`` when both are given. Without a patch, one of ``area`` (default 5 %) is first trained on the
    attacked batch itself (transductive; for unseen images train with :func:`train_patch` on training images and
    pass the result) with the training settings below (see :class:`PatchTraining`).

    ``noise=True`` is the control: every image gets its own patch of uniform random values, of the same footprint
    (the given patch's, else ``area``'s), drawn from its own stream; nothing is trained. Averaged over the images it
    measures what covering that much of the image with an arbitrary patch costs, which one fixed noise patch, a
    single draw, measures only up to that draw's luck.
    """

    name = "patch"
    description = "Universal adversarial patch at a random location, trained with EOT (Brown et al. 2017)"

    patch: Optional[Tensor] = param(None, "The patch, a (C, h, w) tensor in [0, 1] whose size is the budget (None: "
                                    "train one of area on the attacked batch). CLI: --patch FILE.",
                                    compare=False, repr=False)
    area: Optional[float] = param(None, "Patch area budget, a fraction of the image (None: the given patch's size, "
                                  "else 0.05).", fast=0.25)
    noise: bool = param(False, "The control: each image gets its own uniform-noise patch of the same footprint, "
                               "nothing is trained.")
    steps: int = param(PatchTraining.steps, "Training: Adam steps.", fast=10)
    lr: float = param(PatchTraining.lr, "Training: Adam's learning rate in [0, 1] pixel units (cosine-decayed to 0).")
    min_scale: float = param(PatchTraining.min_scale, "Training: smallest random scale of the patch, a fraction of "
                                                      "its size.")
    rotation: float = param(PatchTraining.rotation, "Training: largest random rotation of the patch, in degrees.")
    loss: str = param(PatchTraining.loss, "Training: loss to maximize, margin, ce or dlr.")
    kappa: Optional[float] = param(PatchTraining.kappa, "Training: cap on each image's loss, so images fooled by a "
                                                        "wide margin stop pulling (None: no cap).")
    sink: bool = param(PatchTraining.sink, "Training, untargeted: pull every image towards one sink class, the one "
                                           "whose short trial fools the most images.")
    trial_steps: int = param(PatchTraining.trial_steps, "Training: steps of each short trial.")
    refine: int = param(PatchTraining.refine, "Training: sweeps of the one-pixel search after the gradient steps "
                                              "(0: none).")
    refine_candidates: int = param(PatchTraining.refine_candidates, "Training: one-pixel moves tried per sweep.")

    def _validate(self) -> None:
        super()._validate()
        if self.area is not None:
            check_range("area", self.area, low=0.0, high=1.0, high_inclusive=False)
        if self.patch is not None:
            check_patch(self.patch)
        self.training_config  # validates the training settings

    @property
    def training_config(self) -> PatchTraining:
        """The training settings used when no patch is given (all attacked images in every step)."""
        return PatchTraining(steps=self.steps, lr=self.lr, min_scale=self.min_scale, rotation=self.rotation,
                             loss=self.loss, kappa=self.kappa, sink=self.sink, trial_steps=self.trial_steps,
                             refine=self.refine, refine_candidates=self.refine_candidates, batch_size=None)

    def footprint(self, shape: tuple[int, ...]) -> tuple[int, int]:
        c, h, w = shape
        if self.patch is None:
            return patch_shape(self.area or DEFAULT_AREA, h, w)
        check_patch(self.patch, (c, h, w))
        a, b = self.patch.shape[-2:]
        if self.area is not None:
            check_within_area((a, b), self.area, h, w)
        return a, b

    def config(self) -> dict:
        cfg = super().config()
        if self.patch is not None:
            cfg["patch"] = f"tensor {'x'.join(map(str, self.patch.shape))}"
        return cfg

    def _run(self, ctx: Context) -> tuple[Tensor, Tensor]:
        self.check_images(tuple(ctx.x.shape[1:]))
        shape = self.footprint(ctx.x.shape[1:])
        _, c, h, w = ctx.x.shape
        everyone = torch.arange(ctx.n, device=ctx.x.device)
        if self.noise:
            patch = ctx.rng.uniform(everyone, (c, *shape)).to(ctx.x)
        else:
            patch = self.patch if self.patch is not None else fit_patch(ctx, [shape], self.training_config)
        rows, cols = random_corners(ctx.rng, everyone, shape, h, w)
        x_adv = paste(ctx.x, patch, rows, cols)
        logits = ctx.logits(x_adv, everyone)
        check_target(ctx.target, logits.shape[1])
        return x_adv, logits


LOCATIONS = ("saliency", "center", "random")


@register
@dataclass(frozen=True, kw_only=True)
class LocalizedPatch(PatchAttack):
    """A patch of ``area`` optimized for each image (LaVAN): ``steps`` signed-gradient steps of size ``alpha`` on
    the patch's pixels, starting from uniform noise, stopping for an image once it is fooled, at up to ``restarts``
    locations (the searched location of LaVAN). The first gradient pass, on the clean image, also leaves
    misclassified images as they are.
    """

    name = "lavan"
    description = "Localized per-image patch optimized by gradient steps (LaVAN, Karmon et al. 2018)"

    area: float = param(DEFAULT_AREA, "Patch area, a fraction of the image.", fast=0.1)
    steps: int = param(100, "Signed-gradient steps per location.", fast=10)
    alpha: float = param(0.1, "Step size on the patch's pixels, in [0, 1] pixel units.")
    location: str = param("saliency", "First location: saliency (the window where the loss's input gradient on the "
                                      "clean image is largest), center or random.")
    restarts: int = param(5, "Locations tried per image not yet fooled; after the first, saliency takes the next "
                             "most salient window not overlapping those tried, the others a random one.", fast=1)
    loss: str = param("margin", "Loss to maximize: margin, ce or dlr.")

    def _validate(self) -> None:
        super()._validate()
        check_range("area", self.area, low=0.0, high=1.0, high_inclusive=False)
        check_int("steps", self.steps)
        check_range("alpha", self.alpha, low=0.0)
        check_choice("location", self.location, LOCATIONS)
        check_int("restarts", self.restarts, high=MAX_RESTARTS)
        check_choice("loss", self.loss, LOSSES)

    def footprint(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return patch_shape(self.area, shape[-2], shape[-1])

    def _run(self, ctx: Context) -> tuple[Tensor, Tensor]:
        self.check_images(tuple(ctx.x.shape[1:]))
        objective = target_checked(get_loss(self.loss))
        work = WorkSet.batch(ctx.x)
        logits, _, grad = ctx.value_and_grad(ctx.x, work.ids, objective)
        rows, cols = self._corners(ctx, grad)
        work.retire(ctx.is_adversarial(logits, work.ids), ctx.x, logits)  # already misclassified: nothing to change
        for r in range(self.restarts):
            if work.empty:
                break
            self._attack_at(ctx, work, objective, rows[r][work.ids], cols[r][work.ids], last=r == self.restarts - 1)
        return work.results.x_adv, work.results.logits

    def _attack_at(self, ctx: Context, work: WorkSet, objective: Objective, rows: Tensor, cols: Tensor,
                   last: bool) -> None:
        """Optimize a patch with its corner at ``(rows, cols)`` for every working image; retire the fooled ones
        (and, on the ``last`` location, every image)."""
        _, c, h, w = ctx.x.shape
        work.mask = window_mask(rows, cols, self.footprint(ctx.x.shape[1:]), h, w)  # the patch's pixels
        work.cur = torch.where(work.mask, ctx.rng.uniform(work.ids, (c, h, w)).to(ctx.x), ctx.x[work.ids])
        for step in range(self.steps + 1):
            if step == self.steps:  # steps spent: one last look
                logits = ctx.logits(work.cur, work.ids)
                if last:
                    work.retire_all(work.cur, logits)
                else:
                    work.retire(ctx.is_adversarial(logits, work.ids), work.cur, logits)
                return
            logits, _, work.grad = ctx.value_and_grad(work.cur, work.ids, objective)
            work.retire(ctx.is_adversarial(logits, work.ids), work.cur, logits)
            if work.empty:
                return
            work.cur = torch.where(work.mask, (work.cur + self.alpha * work.grad.sign()).clamp(0.0, 1.0), work.cur)

    def _corners(self, ctx: Context, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Top-left corners ``(rows, cols)``, each ``(restarts, N)``, of every image's patch location per restart."""
        n, _, h, w = ctx.x.shape
        shape = self.footprint(ctx.x.shape[1:])
        if self.location == "saliency":
            return ranked_windows(grad.abs().sum(dim=1, keepdim=True), shape, self.restarts)
        everyone = torch.arange(n, device=ctx.x.device)
        tries = [random_corners(ctx.rng, everyone, shape, h, w) for _ in range(self.restarts)]
        if self.location == "center":
            tries[0] = (torch.full_like(everyone, (h - shape[0]) // 2), torch.full_like(everyone, (w - shape[1]) // 2))
        return torch.stack([t[0] for t in tries]), torch.stack([t[1] for t in tries])
