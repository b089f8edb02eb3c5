"""The attack contract: stateless, keyword-only attacks called as ``atk(model, x, y, target=None, generator=None)``.

An :class:`Attack` holds only hyperparameters, validated when it is built (``ValueError`` at once). The model is
passed on every call. :meth:`Attack.__call__` is final: it checks the inputs, runs the attack's :meth:`Attack._run`
through a :class:`Context` that counts every forward and backward pass per sample, enforces the box and the budget
on the way out, and builds the :class:`AttackResult`.

Guarantees of every call (the contract tests check them for every registered attack):

* the model's mode, parameters, buffers (batch-norm statistics), parameter ``.grad`` and device are left as they
  were (:class:`ModelState`); ``x`` is not modified;
* labels and targets outside the model's classes raise :class:`LabelRangeError`; a model whose parameters have
  another floating dtype than ``x`` (float64, say) is run on ``x`` cast to that dtype;
* ``x_adv`` has ``x``'s shape, dtype and device, lies in [0, 1] and inside the budget;
* ``success`` equals the model's re-prediction on ``x_adv`` (``!= y``, or ``== target`` when targeted);
* the same ``generator`` seed gives the same result.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from attacks.norms import Norm, get_norm
from attacks.params import param
from attacks.rng import SampleRNG

KINDS = ("white-box", "score", "decision", "patch", "pixel")

#: Budget used when an attack is built without ``eps``: 8/255 under Linf, 0.5 under L2 (pixel units of [0, 1]).
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}


class NonFiniteOutputError(ValueError):
    """The model produced NaN or infinite logits. Raised instead of silently zeroing them."""


class LabelRangeError(ValueError):
    """A label or target names a class the model does not have (its logits have fewer columns)."""


def check_labels(labels: Tensor, classes: int, what: str = "label") -> None:
    """Raise :class:`LabelRangeError` unless every value of ``labels`` is a class index in ``[0, classes)``."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise LabelRangeError(f"{what} {bad} is out of range: the model has {classes} classes (0 to {classes - 1})")


def looks_like_probabilities(logits: Tensor) -> bool:
    """Whether model outputs are probabilities (in [0, 1], rows summing to 1) rather than logits."""
    rows = logits.sum(dim=1)
    return bool(logits.min() >= 0 and logits.max() <= 1 and torch.allclose(rows, torch.ones_like(rows), atol=1e-3))


class ModelOutputWarning(UserWarning):
    """A model whose outputs look wrong for attacking (probabilities instead of logits)."""


PROBABILITIES_WARNING = ("the model's outputs look like probabilities, not logits: remove the final softmax, "
                         "or gradient attacks will underestimate it")


class ModelState:
    """What a call must leave as it found it: every module's mode and every buffer (batch-norm statistics move
    when a model in training mode runs forward). :meth:`restore` puts both back.

    Buffers are copied only when some module is in training mode, the one case in which torch's own layers write
    them during a forward pass; parameters and their ``.grad`` are never written (input gradients only).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [m.training for m in model.modules()]
        self.buffers = [(b, b.clone()) for b in model.buffers()] if any(self.flags) else []

    def restore(self) -> None:
        for m, f in zip(self.model.modules(), self.flags):
            m.training = f
        with torch.no_grad():
            for live, saved in self.buffers:
                live.copy_(saved)


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype of the model's first floating parameter (None when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@dataclass(frozen=True)
class AttackResult:
    """What an attack returns; every field is per sample.

    Attributes:
        x_adv: adversarial inputs, same shape/dtype/device as ``x``, in [0, 1] and inside the budget.
        success: ``model(x_adv).argmax(1) != y`` (untargeted) or ``== target`` (targeted).
        queries: forward passes of the model spent on each sample (white-box attacks count too).
        gradients: backward passes (input gradients) spent on each sample; 0 for black-box attacks.
        norms: size of ``x_adv - x`` in the attack's own measure (Linf, L2, L0 pixels, patch area).
        checks: forward passes the referee spent on each sample to learn ``success`` (0 or 1): not the attacker's
            queries, but passes of the model all the same.
    """

    x_adv: Tensor
    success: Tensor
    queries: Tensor
    norms: Tensor
    gradients: Tensor
    checks: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.success.shape[0]


class Context:
    """The only door from an attack to the model: runs it, checks outputs, counts passes per sample.

    ``idx`` arguments are positions in the batch the attack was called with; they say which samples a sub-batch
    holds, so an attack that works only on still-unfooled samples is charged only for those.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, target: Optional[Tensor], rng: SampleRNG):
        self.model = model
        self.x = x
        self.y = y
        self.target = target
        self.rng = rng  # per-sample random streams: draw with rng.uniform(idx, shape) etc.
        self.aim = target  # the class the objectives aim at; may differ from the goal (see `retarget`)
        self.queries = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.gradients = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.checks = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the referee's passes
        # False for :meth:`Attack.perturb`: nobody reads success, so an attack may skip passes made only to learn it
        self.verify = True
        self.final_logits: Optional[Tensor] = None  # what ``_run`` returned besides x_adv (None: not computed)
        self.start: Optional[Tensor] = None  # a caller's warm start (perturbations like x), for attacks accepting one
        dtype = model_dtype(model)
        self.dtype = None if dtype is None or dtype == x.dtype else dtype  # the model's own dtype, when not x's
        self._first = [True]  # shared by retargeted views: labels and outputs are checked on the first pass only

    @property
    def generator(self):
        raise AttributeError(
            "Context.generator was replaced by Context.rng, per-sample random streams that make results independent "
            "of batching: draw with ctx.rng.uniform(idx, shape), .normal(idx, shape), .integers(idx, high, shape), "
            "where idx are the batch positions of the samples drawn for"
        )

    def retarget(self, aim: Tensor) -> "Context":
        """A view whose objectives aim at ``aim`` while success keeps the original goal (and the same counters).

        Used by attacks that reach an untargeted goal through targeted losses (APGD-T).
        """
        view = copy.copy(self)
        view.aim = aim
        return view

    @property
    def targeted(self) -> bool:
        return self.target is not None

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def label_of(self, idx: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """True labels and the classes aimed at (None when untargeted) of the samples at ``idx``."""
        return self.y[idx], (None if self.aim is None else self.aim[idx])

    def forward(self, x: Tensor) -> Tensor:
        """The model on ``x`` (in the model's dtype when it has another one), checked; logits in ``x``'s dtype."""
        if self.dtype is None:
            return self._check(self.model(x))
        return self._check(self.model(x.to(self.dtype))).to(x.dtype)

    def _check(self, logits: Tensor) -> Tensor:
        if logits.dim() != 2:
            raise ValueError(f"the model must return logits of shape (N, classes), got {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise NonFiniteOutputError(
                "the model returned non-finite logits (NaN or inf); refusing to attack it (fix the model or inputs)"
            )
        if self._first[0]:  # before any loss indexes the logits by label
            self._first[0] = False
            check_labels(self.y, logits.shape[1])
            if self.target is not None:
                check_labels(self.target, logits.shape[1], "target class")
            if logits.shape[1] > 1 and looks_like_probabilities(logits.detach()):
                warnings.warn(PROBABILITIES_WARNING, ModelOutputWarning, stacklevel=2)
        return logits

    def logits(self, x: Tensor, idx: Tensor) -> Tensor:
        """Model outputs without gradient; counts one query for each sample in ``idx``."""
        out = self.uncounted_logits(x)
        self.queries.index_add_(0, idx, torch.ones_like(idx))
        return out

    def uncounted_logits(self, x: Tensor) -> Tensor:
        """Model outputs without gradient, checked, and *not* counted: for a caller that has counted them already
        (the black-box oracle counts before the model runs, to refuse a query over budget)."""
        with torch.no_grad():
            return self.forward(x)

    def forward_graph(self, x: Tensor, idx: Tensor) -> Tensor:
        """Logits *with* the autograd graph, for attacks that differentiate through a reparametrization of the
        input (CW) or take several gradients per pass (DeepFool). Counts one query per sample; the caller charges
        each input gradient it takes with :meth:`charge_gradients`."""
        logits = self.forward(x)
        self.queries.index_add_(0, idx, torch.ones_like(idx))
        return logits

    def charge_gradients(self, idx: Tensor, count: int = 1) -> None:
        self.gradients.index_add_(0, idx, torch.full_like(idx, count))

    def value_and_grad(self, x: Tensor, idx: Tensor, objective) -> tuple[Tensor, Tensor, Tensor]:
        """Forward + backward to the input only: returns ``(logits, objective per sample, d objective / d x)``.

        Uses ``torch.autograd.grad`` with respect to the input, never ``backward()``, so parameter gradients are
        neither computed nor accumulated.
        """
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.forward(xg)
            y, t = self.label_of(idx)
            value = objective(logits, y, t)
            (grad,) = torch.autograd.grad(value.sum(), xg)
        ones = torch.ones_like(idx)
        self.queries.index_add_(0, idx, ones)
        self.gradients.index_add_(0, idx, ones)
        return logits.detach(), value.detach(), grad

    def is_adversarial(self, logits: Tensor, idx: Tensor) -> Tensor:
        """Whether predictions from ``logits`` meet the goal for the samples at ``idx``."""
        pred = logits.argmax(dim=1)
        return pred.ne(self.y[idx]) if self.target is None else pred.eq(self.target[idx])


def _make_rng(generator, x: Tensor) -> SampleRNG:
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    if isinstance(generator, torch.Generator):
        return SampleRNG.from_generator(generator, x.shape[0], x.device)
    keys = torch.as_tensor(generator)
    if keys.shape != (x.shape[0],) or keys.is_floating_point():
        raise ValueError(f"generator must be a torch.Generator or integer per-sample seeds of shape ({x.shape[0]},)")
    return SampleRNG(keys, x.device)


def _check_model_device(model: nn.Module, x: Tensor) -> None:
    p = next(iter(model.parameters()), None)
    if p is not None and p.device != x.device:
        raise ValueError(f"model is on {p.device} but x is on {x.device}: move one of them first")


@dataclass(frozen=True, kw_only=True)
class Attack:
    """Base class of every attack. Subclasses are frozen keyword-only dataclasses that implement ``_run``.

    Class attributes every attack declares (the registry reads them):
        name: registry name, e.g. ``"pgd"``.
        kind: one of ``white-box``, ``score``, ``decision``, ``patch``, ``pixel``.
        supported_norms: norms the attack can bound or minimize.
        targeted_ok: whether a ``target`` may be passed.
        accepts_start: whether a warm ``start`` may be passed (the gradient-ascent family).
        positive_budget: whether ``eps`` must be > 0 (not just >= 0).
        description: one line for ``robustcnn attacks``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "white-box"
    supported_norms: ClassVar[tuple[str, ...]] = ("linf",)
    targeted_ok: ClassVar[bool] = True
    accepts_start: ClassVar[bool] = False
    positive_budget: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._validate()

    # -- hooks for subclasses --------------------------------------------------------------------------------
    def _validate(self) -> None:
        """Raise ``ValueError`` for invalid hyperparameters. Called by ``__init__``."""

    def _run(self, ctx: Context) -> tuple[Tensor, Optional[Tensor]]:
        """Return ``(x_adv, logits of x_adv)`` for the whole batch in ``ctx``.

        Return ``None`` for the logits when the attack does not have them (a decision-based attack sees labels
        only): ``__call__`` then runs one verification pass, which sets ``success`` and is *not* counted in
        ``queries`` (it is the referee's pass, not the attacker's). Returned logits must be the model's outputs on
        exactly the returned ``x_adv``.
        """
        raise NotImplementedError

    def _enforce(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Make ``x_adv`` valid: inside [0, 1] (and, in bounded attacks, inside the budget)."""
        return x_adv.clamp(0.0, 1.0)

    def _measure(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Perturbation size in the attack's own measure."""
        return self.norm_obj.measure(x_adv - x)

    @property
    def norm_obj(self) -> Norm:
        return get_norm(getattr(self, "norm", self.supported_norms[0]))

    def _check_budget(self, shape: Optional[tuple[int, ...]] = None) -> None:
        """Refuse an ``eps`` its norm does not allow (``ValueError``), on images of ``shape`` ``(C, H, W)`` when
        given: checked when the attack is built, and again with the inputs' shape when it is called."""
        eps = getattr(self, "eps", None)
        if eps is not None:
            self.norm_obj.check_budget(eps, shape, positive=self.positive_budget)

    def samples_per_call(self, batch_size: int) -> int:
        """How many samples a caller that works in batches of ``batch_size`` (:func:`attacks.evaluate`) should
        hand this attack per call: ``batch_size``, unless the attack schedules its own work set (the score-based
        attacks take many batches at once and keep their model calls full)."""
        return batch_size

    def config(self) -> dict:
        """The attack's name and hyperparameters as a plain dict (for reports).

        Fields marked ``runtime`` (how the work is split, never what it computes) are left out, so they change
        neither reports nor the per-sample random streams that :func:`attacks.evaluate` keys by this dict.
        """
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("runtime"):
                del out[f.name]
        return {"attack": self.name, **out}

    # -- the final public call ---------------------------------------------------------------------------------
    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Optional[Tensor | int] = None,
        generator: Optional[torch.Generator] = None,
        *,
        start: Optional[Tensor] = None,
    ) -> AttackResult:
        """Attack ``model`` on the batch ``(x, y)``.

        Args:
            model: any classifier ``nn.Module`` mapping images in [0, 1] of shape (N, C, H, W) to logits (N, K).
            x: inputs in [0, 1], floating point. Never modified.
            y: true labels, integers of shape (N,).
            target: desired classes for a targeted attack (an int for all samples, or shape (N,)); None = untargeted.
            generator: where every random draw comes from: a ``torch.Generator`` (its state picks one random
                stream per sample), or an integer tensor (N,) of per-sample seeds (see
                :func:`attacks.rng.sample_keys`) — then each sample's result is independent of the batch it is in.
                None means a generator seeded with 0, so calls are reproducible by default.
            start: a warm start, only for attacks with ``accepts_start`` (the gradient-ascent family): perturbations
                shaped like ``x`` to begin from instead of the attack's own start, e.g. each sample's adversarial
                example from an earlier call minus ``x``. Projected onto the budget, ``x + start`` clipped to [0, 1];
                restarts after the first draw their own starts. Never modified.
        """
        ctx, x_adv = self._attack(model, x, y, target, generator, start, verify=True)
        success = ctx.is_adversarial(ctx.final_logits, torch.arange(ctx.n, device=x.device))
        return AttackResult(
            x_adv=x_adv,
            success=success,
            queries=ctx.queries,
            norms=self._measure(ctx.x, x_adv),
            gradients=ctx.gradients,
            checks=ctx.checks,
        )

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Optional[Tensor | int] = None,
        generator: Optional[torch.Generator] = None,
        *,
        start: Optional[Tensor] = None,
    ) -> Tensor:
        """Only the adversarial examples of :meth:`__call__` (same arguments, same draws), for adversarial training.

        Nobody is told which samples were fooled, so passes made only to find out are skipped: the referee's, and
        the final forward pass of iterative attacks that do not stop early. ``x_adv`` is the same as ``__call__``'s
        except where a fooled sample's early exit would have kept an earlier iterate; it is inside the budget and
        [0, 1] all the same.
        """
        return self._attack(model, x, y, target, generator, start, verify=False)[1]

    def _attack(self, model, x, y, target, generator, start, *, verify: bool) -> tuple["Context", Tensor]:
        """Check the inputs and run the attack: its context and ``x_adv`` made valid by :meth:`_enforce`.

        With ``verify``, ``ctx.final_logits`` are the model's logits on exactly that ``x_adv``. Everything that runs
        the model happens before the model's state is put back (:class:`ModelState`)."""
        x, y, target = self._check_inputs(model, x, y, target)
        self._check_budget(tuple(x.shape[1:]))
        start = self._check_start(start, x)
        if model.training:
            warnings.warn(
                f"{self.name}: the model is in training mode (dropout/batch-norm statistics change its outputs); "
                "call model.eval() before attacking it",
                stacklevel=3,
            )
        rng = _make_rng(generator, x)
        saved = ModelState(model)
        ctx = Context(model, x, y, target, rng)
        ctx.verify, ctx.start = verify, start
        try:
            raw, ctx.final_logits = self._run(ctx)
            raw = raw.detach().to(x.dtype)
            x_adv = self._enforce(x, raw)
            if verify:
                ctx.final_logits = self._referee(ctx, raw, x_adv)
        finally:
            saved.restore()
        return ctx, x_adv

    @staticmethod
    def _referee(ctx: Context, raw: Tensor, x_adv: Tensor) -> Tensor:
        """Logits on ``x_adv``. The referee's pass sets ``success``; it is not charged to the attacker's queries.
        It runs on every sample when the attack returned no logits, and on the samples ``_enforce`` had to change
        otherwise."""
        logits = ctx.final_logits
        redo = None if logits is None else (x_adv != raw).reshape(ctx.n, -1).any(dim=1)
        if logits is None or redo.any():
            with torch.no_grad():
                if logits is None:
                    logits = ctx.forward(x_adv)
                    ctx.checks += 1
                else:
                    logits = logits.clone()
                    logits[redo] = ctx.forward(x_adv[redo])
                    ctx.checks += redo.long()
        return logits

    def _check_start(self, start: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
        if start is None:
            return None
        if not self.accepts_start:
            raise ValueError(f"{self.name} takes no start: only the gradient-ascent attacks (FGSM, BIM, PGD, MI-FGSM, "
                             "EOT-PGD, PGD-KL) begin from a given perturbation")
        if not isinstance(start, Tensor) or not start.is_floating_point() or start.shape != x.shape:
            raise ValueError(f"start must be a floating-point tensor shaped like x {tuple(x.shape)}, got "
                             f"{tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__}")
        if not torch.isfinite(start).all():
            raise ValueError("start must hold finite values")
        return start.detach().to(x)

    def _check_inputs(self, model, x, y, target):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError("x must be a floating-point tensor of images in [0, 1]")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, C, H, W), got shape {tuple(x.shape)}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError("x must lie in [0, 1]: put normalization inside the model, not on the inputs")
        y = torch.as_tensor(y, device=x.device)
        if y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {tuple(y.shape)} {y.dtype}")
        y = y.long()
        if target is not None:
            if not self.targeted_ok:
                raise ValueError(f"{self.name} has no targeted mode")
            target = torch.as_tensor(target, device=x.device)
            if target.dim() == 0:
                target = target.expand(x.shape[0])
            if target.shape != (x.shape[0],) or target.is_floating_point():
                raise ValueError(f"target must be an int or integer labels of shape ({x.shape[0]},)")
            target = target.long()
        _check_model_device(model, x)
        return x, y, target


@dataclass(frozen=True, kw_only=True)
class BoundedAttack(Attack):
    """An attack that stays inside an Lp ball of radius ``eps`` around ``x``."""

    eps: Optional[float] = param(None, "Budget: the radius of the ball, in [0, 1] pixel units measured in norm "
                                 "(None: 8/255 under Linf, 0.5 under L2).", fast=0.3)
    norm: str = param("linf", "Threat model: the norm of the ball (linf or l2, as the attack supports).")

    def _validate(self) -> None:
        super()._validate()
        check_norm(self, self.norm)
        if self.eps is None:  # the budget most papers use for this norm on [0, 1] images
            object.__setattr__(self, "eps", DEFAULT_EPS[self.norm])
        self._check_budget()

    def _enforce(self, x: Tensor, x_adv: Tensor) -> Tensor:
        box = self.norm_obj.box(x, self.eps)
        if box is not None:  # Linf: ball and [0, 1] in one clamp, exact on points the attack already clamped to it
            return torch.clamp(x_adv, box[0], box[1])
        return self.norm_obj.clip(x, x_adv, self.eps)


# -- validation helpers shared by every attack (clear ValueErrors, never asserts) -------------------------------
def check_range(name: str, value, *, low=None, high=None, low_inclusive=False, high_inclusive=True) -> None:
    """Refuse a number outside ``[low, high]`` (bounds optional, inclusivity configurable)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")


#: Upper bounds of counts, far above any useful setting and low enough that a slip (``2**63``) is refused at once
#: instead of running for ever: iterations of any kind (steps, binary-search steps, candidates, population, ...),
#: model queries per sample, restarts, and sizes of the batches a model is called on.
MAX_ITERATIONS = 100_000
MAX_QUERIES = 10_000_000
MAX_RESTARTS = 1_000
MAX_BATCH = 1_000_000


def check_int(name: str, value, *, low: int = 1, high: int = MAX_ITERATIONS) -> None:
    """Refuse anything but an integer in ``[low, high]``; ``high`` defaults to :data:`MAX_ITERATIONS`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{name} must be <= {high:,} (a bound far above any useful setting, so that one call "
                         f"ends), got {value}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_norm(attack: Attack, norm: str) -> None:
    if norm not in attack.supported_norms:
        raise ValueError(
            f"{attack.name} does not support norm {norm!r}: it supports {', '.join(attack.supported_norms)}"
        )


@dataclass(frozen=True, kw_only=True)
class MinNormAttack(Attack):
    """An attack that searches for the *smallest* adversarial perturbation (DeepFool, CW, decision attacks).

    ``eps=None`` leaves it unbounded: ``norms`` then report the size it needed. With ``eps`` set, a sample counts as
    fooled only if its perturbation fits the budget; larger ones are discarded (``x_adv = x``).
    """

    eps: Optional[float] = param(None, "Budget in [0, 1] pixel units measured in norm: a sample counts as fooled "
                                 "only within it (None: unbounded, the norm needed is reported).")
    norm: str = param("l2", "The norm whose size is minimized (as the attack supports).")

    def _validate(self) -> None:
        super()._validate()
        check_norm(self, self.norm)
        self._check_budget()

    def _enforce(self, x: Tensor, x_adv: Tensor) -> Tensor:
        x_adv = x_adv.clamp(0.0, 1.0)
        if self.eps is None:
            return x_adv
        too_big = self.norm_obj.measure(x_adv - x) > self.eps * (1 + 1e-6)
        return torch.where(too_big.reshape(-1, *([1] * (x.dim() - 1))), x, x_adv)
