"""Adversarial training: the threat model a run trains for (:class:`AdvConfig`) and the training step that uses it.

Four methods, each an inner maximization (an attack from :mod:`attacks`, on the model in eval mode) and an outer
loss the optimizer minimizes:

* ``pgd`` — Madry et al. 2018: cross-entropy on PGD examples (random start, every sample takes every step).
* ``trades`` — Zhang et al. 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x'))``, ``x'`` maximizing that KL
  (:class:`attacks.KLPGD`).
* ``fast`` — Wong, Rice & Kolter 2020: cross-entropy on FGSM examples from a uniform random start with step
  ``1.25 * eps``. Cheap, and known to overfit catastrophically now and then, which the validation below catches.
* ``mart`` — Wang et al. 2020: boosted cross-entropy on PGD examples ``+ beta * KL(f(x) || f(x'))`` weighted by
  ``1 - p_y(x)``, so misclassified clean samples weigh more.
* ``ibp`` — Gowal et al. 2018: no attack; ``kappa * CE(f(x), y) + (1 - kappa) * CE(worst-case logits, y)`` with the
  worst case over the Linf box from interval bound propagation (:mod:`robustcnn.certify.ibp`). After a warm-up of
  natural training (the first fifth of ``eps_warmup``), eps rises linearly to its full value and kappa falls from 1
  to 1/2 over the rest of ``eps_warmup``. One process only (the bounds run outside DistributedDataParallel).

Every epoch, :meth:`AdversarialTraining.validate` measures clean, PGD and FGSM accuracy on a held-out slice of the
training set (never trained on); the run keeps the epoch with the best PGD accuracy (``ibp``: IBP-verified accuracy),
and a collapse of PGD accuracy while FGSM accuracy holds is reported as catastrophic overfitting. Randomness: each sample's attack draws come from
its own stream keyed by (seed, epoch, its index in the training set), so results do not depend on batching.

Where the inner attack starts (``init``): ``random``, each method's own start (uniform in the ball), or ``prior``,
each training image's adversarial perturbation from its previous epoch (a warm start that lets the attack's steps
accumulate over the epochs: Zheng et al., "Efficient Adversarial Training with Transferable Adversarial Examples",
CVPR 2020; Jia et al., "Prior-Guided Adversarial Initialization for Fast Adversarial Training", ECCV 2022). An
image without one yet (the first epoch) starts at random. The perturbations are kept as int8 in units of
``min(eps, 1) / 127``: one byte per pixel and channel of the training set (46 MB for Fashion-MNIST).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import attacks
from attacks.base import MAX_ITERATIONS
from attacks.norms import get_norm
from attacks.rng import SampleRNG, sample_keys
from robustcnn.certify.ibp import check_supported, verified, verified_loss
from robustcnn.data import ImageData, to_float
from robustcnn.errors import UsageError, check_choice

METHODS: tuple[str, ...] = ("pgd", "trades", "fast", "mart", "ibp")
NORMS: tuple[str, ...] = ("linf", "l2")
INITS: tuple[str, ...] = ("random", "prior")
ATTACK_BN: tuple[str, ...] = ("eval", "train")
#: Attack steps per batch when none are given, chosen by measurement (docs/adversarial-training.md).
DEFAULT_STEPS = {"pgd": 5, "trades": 5, "mart": 5, "fast": 1}
DEFAULT_BETA = {"trades": 6.0, "mart": 6.0}


@dataclass(frozen=True)
class Recipe:
    """What ``robustcnn train --adv METHOD`` trains with where its options are not given: the architecture (with
    ``arch``, its own settings, which apply only when the model is not named), the optimizer, the epochs and the decay
    of the moving average of the weights (None: none). Chosen by measurement (docs/adversarial-training.md)."""

    model: str
    optimizer: str
    epochs: int
    arch: dict[str, Any] = field(default_factory=dict)
    ema: float | None = None


#: The recipe of each method. ``pgd``: a wide `simple` CNN, Adam and an average of the weights beat the `vgg` with SGD
#: on both clean and robust accuracy in less time; the others keep `vgg` and SGD (trades and mart cost more per
#: step, so fewer epochs; fast is kept near a third of pgd's time).
RECIPES = {
    "pgd": Recipe("simple", "adam", 12, {"width": 40, "hidden": 256}, 0.999),
    "trades": Recipe("vgg", "sgd", 8),
    "mart": Recipe("vgg", "sgd", 8),
    "fast": Recipe("vgg", "sgd", 8),
    "ibp": Recipe("vgg", "sgd", 10),
}
#: Epochs of ``robustcnn train --adv METHOD`` when not told otherwise.
DEFAULT_EPOCHS = {method: recipe.epochs for method, recipe in RECIPES.items()}
#: ``--adv ibp``'s ramp of eps (and kappa) in epochs when ``eps_warmup`` is not given: IBP needs one.
IBP_RAMP_EPOCHS = 5.0
#: Validation streams (distinct from the training epochs' streams, which are 1 + epoch).
_VAL_PGD_STREAM, _VAL_FGSM_STREAM = -1, -2


@dataclass(frozen=True)
class AdvConfig:
    """The threat model a run trains for and how. Stored in checkpoints (``meta["adversarial"]``) as a plain dict.

    ``steps``, ``alpha`` and ``beta`` left as None get the method's defaults, filled in here, so the stored config
    names the values really used: 5 steps (``fast``: 1), ``alpha = 2.5 * eps / steps`` (``fast``: ``1.25 * eps``
    from a random start, ``0.5 * eps`` from a prior one), ``beta = 6`` for ``trades`` and ``mart``. ``init``: where
    the inner attack starts (``random`` or ``prior``, see the module docstring). ``eps_warmup``: epochs over which
    the training budget rises linearly from 0 to ``eps`` (validation always uses ``eps``). ``val_count`` training
    images are held out for validation; ``val_steps`` is the PGD used there. ``attack_bn``: batch-norm mode during
    the inner maximization (``eval``: running statistics, as the attack library requires; ``train``: batch
    statistics, running ones left alone).
    """

    method: str = "pgd"
    eps: float = 0.1
    norm: str = "linf"
    steps: int | None = None
    alpha: float | None = None
    beta: float | None = None
    eps_warmup: float = 0.0
    val_count: int = 1000
    val_steps: int = 10
    attack_bn: str = "eval"
    init: str = "random"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "method", check_choice("adversarial method", self.method, METHODS))
        set_(self, "norm", check_choice("norm", self.norm, NORMS))
        set_(self, "attack_bn", check_choice("attack batch-norm mode", self.attack_bn, ATTACK_BN))
        set_(self, "init", check_choice("attack start", self.init, INITS))
        if not _number(self.eps) or self.eps <= 0 or (self.norm == "linf" and self.eps > 1):
            raise UsageError(f"--eps must be in (0, 1] (pixel units of [0, 1] images) for --adv, got {self.eps}"
                             if self.norm == "linf" else f"--eps must be > 0 for --adv, got {self.eps}")
        set_(self, "eps", float(self.eps))
        if self.method == "ibp":
            self._check_ibp()
            return
        if self.method == "fast":
            if self.steps not in (None, 1):
                raise UsageError(f"--adv fast takes exactly one FGSM step; --adv-steps {self.steps} does not apply "
                                 "(use --adv pgd for several steps)")
        steps = DEFAULT_STEPS[self.method] if self.steps is None else self.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_ITERATIONS:
            raise UsageError(f"--adv-steps must be an integer >= 1 and <= {MAX_ITERATIONS:,}, got {self.steps}")
        set_(self, "steps", steps)
        if self.alpha is not None and (not _number(self.alpha) or self.alpha <= 0):
            raise UsageError(f"--adv-alpha must be > 0, got {self.alpha}")
        if self.method == "fast":  # from a prior start, large steps overfit catastrophically (1.25 eps did here)
            default_alpha = (0.5 if self.init == "prior" else 1.25) * self.eps
        else:
            default_alpha = 2.5 * self.eps / steps
        set_(self, "alpha", float(default_alpha if self.alpha is None else self.alpha))
        if self.method in DEFAULT_BETA:
            beta = DEFAULT_BETA[self.method] if self.beta is None else self.beta
            if not _number(beta) or beta < 0:
                raise UsageError(f"--beta must be >= 0, got {self.beta}")
            set_(self, "beta", float(beta))
        elif self.beta is not None:
            if _number(self.beta) and self.beta < 0:
                raise UsageError(f"--beta must be >= 0, got {self.beta}")
            raise UsageError(f"--beta applies to --adv trades and mart only, not {self.method}")
        self._check_common()

    def _check_common(self) -> None:
        if not _number(self.eps_warmup) or self.eps_warmup < 0:
            raise UsageError(f"--eps-warmup must be >= 0 epochs, got {self.eps_warmup}")
        object.__setattr__(self, "eps_warmup", float(self.eps_warmup))
        for name, flag in (("val_count", "--adv-val"), ("val_steps", "validation steps")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{flag} must be an integer >= 1, got {value}")

    def _check_ibp(self) -> None:
        """``ibp`` has no inner attack: attack options are refused; the ramp defaults to ``IBP_RAMP_EPOCHS``."""
        given = [flag for flag, value in (("--adv-steps", self.steps), ("--adv-alpha", self.alpha),
                                          ("--beta", self.beta)) if value is not None]
        if self.init != "random":
            given.append("--adv-init")
        if given:
            raise UsageError(f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply to --adv ibp "
                             "(it bounds the whole box instead of attacking)")
        if self.norm != "linf":
            raise UsageError("--adv ibp certifies Linf boxes only: use --adv-norm linf")
        if self.eps_warmup == 0:
            object.__setattr__(self, "eps_warmup", IBP_RAMP_EPOCHS)
        self._check_common()

    def ibp_schedule(self, progress: float) -> tuple[float, float]:
        """``(eps, kappa)`` of ``ibp`` after ``progress`` epochs: natural training (eps 0, kappa 1) for the first
        fifth of ``eps_warmup``, then eps rising linearly to ``eps`` and kappa falling to 1/2 (Gowal et al.)."""
        start = 0.2 * self.eps_warmup
        ramp = min(1.0, max(0.0, (progress - start) / (self.eps_warmup - start))) if self.eps_warmup > 0 else 1.0
        return self.eps * ramp, 1.0 - 0.5 * ramp

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict: the threat model (method, norm, eps, steps, alpha, beta, ...)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdvConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def eps_at(self, progress: float) -> float:
        """The training budget after ``progress`` epochs (the linear warm-up, then ``eps``)."""
        if self.eps_warmup <= 0:
            return self.eps
        return self.eps * min(1.0, max(progress, 0.0) / self.eps_warmup)

    def inner_attack(self, eps: float | None = None) -> attacks.Attack:
        """The attack that makes the training examples, at budget ``eps`` (default: the full budget).

        A smaller ``eps`` (warm-up) scales the step size with it.
        """
        eps = self.eps if eps is None else eps
        alpha = self.alpha * eps / self.eps
        if self.method == "trades":
            return attacks.KLPGD(eps=eps, norm=self.norm, steps=self.steps, alpha=alpha)
        # fast: PGD with one step from a uniform random start is exactly FGSM with random start (Wong et al.)
        return attacks.PGD(eps=eps, norm=self.norm, steps=self.steps, alpha=alpha, random_start=True,
                           early_stop=False)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def split_held_out(data: ImageData, count: int) -> tuple[ImageData, ImageData]:
    """(training part, held-out part): the last ``count`` images are held out for validation."""
    if count >= len(data):
        raise UsageError(f"--adv-val {count} leaves no training images: the training set has {len(data)}")
    cut = len(data) - count
    return (ImageData(data.images[:cut], data.labels[:cut], data.classes, data.name),
            ImageData(data.images[cut:], data.labels[cut:], data.classes, data.name))


def check_differentiable(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str) -> None:
    """Refuse (:class:`UsageError`) a model whose loss has no usable input gradient: no attack could train it;
    for ``ibp``, a model with a layer interval bounds cannot pass."""
    if method == "ibp":
        try:
            check_supported(model)
        except ValueError as exc:
            raise UsageError(f"--adv ibp: {exc}") from None
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        xg = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(xg)
            grad = None
            if out.requires_grad:
                (grad,) = torch.autograd.grad(F.cross_entropy(out.float(), y), xg, allow_unused=True)
    finally:
        for m, f in zip(model.modules(), flags):
            m.training = f
    if grad is None or not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
        raise UsageError(f"--adv {method} needs a model with input gradients, but this model's outputs have "
                         f"{'none' if grad is None else 'only zero or non-finite ones'}: train it without --adv")


class _AttackMode:
    """The model's mode during the inner maximization; the caller's flags (and BN momenta) are restored after."""

    def __init__(self, model: nn.Module, bn: str) -> None:
        self.model, self.bn = model, bn

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.model.modules()]
        self.momenta: list[tuple[nn.Module, Any]] = []
        if self.bn == "eval":
            self.model.eval()
            return
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.momenta.append((m, m.momentum))
                m.momentum = 0.0  # batch statistics in the forward pass, running statistics untouched
        self.quiet = warnings.catch_warnings()
        self.quiet.__enter__()
        warnings.filterwarnings("ignore", message=".*training mode.*")

    def __exit__(self, *exc: Any) -> None:
        if self.bn != "eval":
            self.quiet.__exit__(*exc)
        for m, momentum in self.momenta:
            m.momentum = momentum
        for m, f in zip(self.model.modules(), self.flags):
            m.training = f


class AdversarialTraining:
    """The per-batch loss and the per-epoch validation of one adversarial run (see the module docstring)."""

    def __init__(self, config: AdvConfig, held_out: ImageData, *, seed: int, label_smoothing: float = 0.0,
                 eval_batch_size: int = 250, train_size: int = 0) -> None:
        """``train_size``: images in the training set (the ``index`` range), needed for ``init="prior"``."""
        self.config, self.held_out, self.seed = config, held_out, seed
        self.label_smoothing = label_smoothing
        self.eval_batch_size = eval_batch_size
        self._full = None if config.method == "ibp" else config.inner_attack()
        self.train_size = train_size
        # init="prior": each training image's last perturbation (int8, units of _scale) and whether it has one yet
        self._prior: torch.Tensor | None = None
        self._has_prior: torch.Tensor | None = None
        self._scale = min(config.eps, 1.0) / 127
        #: The validation accuracy that picks the kept epoch: IBP-verified for ``ibp``, PGD for the attacks.
        self.kept_by = "val_verified_accuracy" if config.method == "ibp" else "val_robust_accuracy"

    # -- training ---------------------------------------------------------------------------------------------
    def adversarial_examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                             epoch: int, progress: float) -> torch.Tensor:
        """The inner maximization for a batch; ``index``: the samples' positions in the training set."""
        eps = self.config.eps_at(progress)
        attack = self._full if eps == self.config.eps else self.config.inner_attack(eps)
        keys = sample_keys(self.seed, index, stream=1 + epoch)
        start = self._prior_start(x, index, keys, eps) if self.config.init == "prior" else None
        with _AttackMode(model, self.config.attack_bn):
            x_adv = attack.perturb(model, x, y, generator=keys, start=start).detach()
        if self.config.init == "prior":
            self._remember(x_adv - x, index)
        return x_adv

    def _prior_start(self, x: torch.Tensor, index: torch.Tensor, keys: torch.Tensor,
                     eps: float) -> torch.Tensor | None:
        """The batch's previous perturbations; a random draw (the attack's own) where an image has none yet."""
        if self._prior is None:
            return None
        rows = index.to(self._prior.device)
        has = self._has_prior[rows]
        count = int(has.sum())  # one device sync for both cases below
        if count == 0:
            return None
        start = self._prior[rows].to(x).mul_(self._scale)
        if count < has.numel():
            fresh = get_norm(self.config.norm).random(SampleRNG(keys, x.device), torch.arange(x.shape[0]),
                                                     tuple(x.shape[1:]), eps).to(x)
            start = torch.where(has.to(x.device).view(-1, *[1] * (x.dim() - 1)), start, fresh)
        return start

    def _remember(self, delta: torch.Tensor, index: torch.Tensor) -> None:
        if self._prior is None:
            if index.max() >= self.train_size:
                raise ValueError(f"training index {int(index.max())} outside the {self.train_size} images this "
                                 "run was set up for (pass train_size)")
            self._prior = torch.zeros((self.train_size, *delta.shape[1:]), dtype=torch.int8, device=delta.device)
            self._has_prior = torch.zeros(self.train_size, dtype=torch.bool, device=delta.device)
        rows = index.to(self._prior.device)
        self._prior[rows] = delta.div(self._scale).round_().clamp_(-127, 127).to(torch.int8)
        self._has_prior[rows] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to go on exactly: the prior perturbations (empty without ``init="prior"``)."""
        if self._prior is None:
            return {}
        return {"prior": self._prior.cpu(), "has_prior": self._has_prior.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        if "prior" in state:
            self._prior, self._has_prior = state["prior"].to(device), state["has_prior"].to(device)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, where: Any,
             net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean training loss, logits on the adversarial batch)`` — the ``batch_loss`` hook of ``train``.

        ``where`` has ``index`` (training-set positions), ``epoch`` (0-based), ``step`` and ``steps``. The attack
        runs on ``model``; the loss comes from one forward call of ``net`` (default ``model``; under DDP its
        wrapper): TRADES and MART run the clean and the adversarial batch through it together.
        """
        net = model if net is None else net
        progress = where.epoch + (where.step + 1) / where.steps
        if self.config.method == "ibp":
            return self._ibp_loss(model, x, y, progress, net)
        x_adv = self.adversarial_examples(model, x, y, where.index, where.epoch, progress)
        method, smooth = self.config.method, self.label_smoothing
        if method in ("pgd", "fast"):
            logits = net(x_adv)
            return F.cross_entropy(logits, y, label_smoothing=smooth), logits
        clean, logits = net(torch.cat([x, x_adv])).split(x.shape[0])
        log_clean = F.log_softmax(clean.float(), dim=1)
        log_adv = F.log_softmax(logits.float(), dim=1)
        kl = F.kl_div(log_adv, log_clean, reduction="none", log_target=True).sum(dim=1)  # KL(f(x) || f(x'))
        if method == "trades":
            return F.cross_entropy(clean, y, label_smoothing=smooth) + self.config.beta * kl.mean(), logits
        # mart: boosted CE on x' (CE plus -log(1 - largest wrong probability)), KL weighted by 1 - p_y(x)
        p_adv = log_adv.exp()
        wrong = p_adv.scatter(1, y[:, None], 0.0).amax(dim=1)
        boosted = F.cross_entropy(logits, y, label_smoothing=smooth) - torch.log1p(-wrong + 1e-4).mean()
        true_clean = log_clean.gather(1, y[:, None])[:, 0].exp()
        return boosted + self.config.beta * (kl * (1.0 - true_clean)).mean(), logits

    def _ibp_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float,
                  net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if net is not model:
            raise UsageError("--adv ibp trains in one process: its bounds run outside DistributedDataParallel")
        eps, kappa = self.config.ibp_schedule(progress)
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if eps > 0:
            loss = kappa * loss + (1 - kappa) * verified_loss(model, x, y, eps)
        return loss, logits

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Clean, PGD and FGSM accuracy on the held-out images at the full budget (model in eval mode); for
        ``ibp`` also the IBP-verified accuracy (``val_verified_accuracy``)."""
        cfg = self.config
        pgd = attacks.PGD(eps=cfg.eps, norm=cfg.norm, steps=cfg.val_steps)
        fgsm = attacks.FGSM(eps=cfg.eps, norm=cfg.norm)
        start = time.perf_counter()
        clean = robust = single = proven = 0
        flags = [m.training for m in model.modules()]
        model.eval()
        try:
            for first in range(0, len(self.held_out), self.eval_batch_size):
                index = torch.arange(first, min(first + self.eval_batch_size, len(self.held_out)))
                x = to_float(self.held_out.images[index.to(self.held_out.images.device)], device)
                x = x.contiguous(memory_format=torch.channels_last)
                y = self.held_out.labels[index.to(self.held_out.labels.device)].to(device)
                with torch.no_grad():
                    right = model(x).argmax(1) == y
                clean += int(right.sum())
                if cfg.method == "ibp":
                    proven += int(verified(model, x, y, cfg.eps).sum())
                for attack, stream in ((pgd, _VAL_PGD_STREAM), (fgsm, _VAL_FGSM_STREAM)):
                    fooled = attack(model, x, y, generator=sample_keys(self.seed, index, stream=stream)).success
                    hits = int((right & ~fooled).sum())
                    if attack is pgd:
                        robust += hits
                    else:
                        single += hits
        finally:
            for m, f in zip(model.modules(), flags):
                m.training = f
        n = len(self.held_out)
        found = {"val_clean_accuracy": clean / n, "val_robust_accuracy": robust / n, "val_fgsm_accuracy": single / n}
        if cfg.method == "ibp":
            found["val_verified_accuracy"] = proven / n
        return {**found, "val_seconds": time.perf_counter() - start}


def overfitting(history: list[dict[str, Any]]) -> str | None:
    """A one-line diagnosis when the newest epoch of ``history`` shows catastrophic overfitting, else None.

    Signs (Wong et al. 2020): PGD accuracy collapses — below half the best earlier epoch's — while FGSM accuracy
    does not fall; or PGD accuracy is below half of FGSM accuracy with a gap of 30 points or more (the model only
    resists the single-step attack it was trained on: its gradients stopped pointing at its weaknesses).
    """
    if not history or "val_robust_accuracy" not in history[-1]:
        return None
    now = history[-1]
    pgd, fgsm = now["val_robust_accuracy"], now["val_fgsm_accuracy"]
    earlier = [h for h in history[:-1] if "val_robust_accuracy" in h]
    best = max(earlier, key=lambda h: h["val_robust_accuracy"], default=None)
    if best is not None and best["val_robust_accuracy"] >= 0.1 and pgd < 0.5 * best["val_robust_accuracy"] \
            and fgsm >= best["val_fgsm_accuracy"] - 0.02:
        return (f"catastrophic overfitting at epoch {now['epoch']}: PGD accuracy fell to {pgd:.1%} from "
                f"{best['val_robust_accuracy']:.1%} (epoch {best['epoch']}) while FGSM accuracy is {fgsm:.1%}")
    if fgsm - pgd >= 0.3 and pgd < 0.5 * fgsm:
        return (f"catastrophic overfitting at epoch {now['epoch']}: PGD accuracy {pgd:.1%} against FGSM accuracy "
                f"{fgsm:.1%} (the model only resists the single-step attack)")
    return None
