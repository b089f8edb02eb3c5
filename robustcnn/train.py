"""The training core: a frozen :class:`TrainConfig`, :func:`train` and :func:`evaluate`.

Everything random is seeded from the config: the model's initial weights from ``seed``, and each epoch's shuffle,
augmentation and dropout from ``(seed, epoch)``. Together with the resume state saved after every epoch, this makes
an interrupted and resumed run end bit-identical to an uninterrupted one (same device, same thread count).
The global RNG is only touched inside ``torch.random.fork_rng``, so callers' random state is left as it was.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from robustcnn.advtrain import AdvConfig, AdversarialTraining, check_differentiable, overfitting, split_held_out
from robustcnn.certify.smoothing import add_gaussian_noise
from robustcnn.checkpoint import check_meta, read_checkpoint, save_checkpoint, versions
from robustcnn.data import DATASETS, ImageData, augment, channel_stats, horizontal_flip_is_sensible, to_float
from robustcnn.distributed import SINGLE, DistContext
from robustcnn.errors import CheckpointError, UsageError, check_choice
from robustcnn.fsutil import OutputLock, refuse_foreign
from robustcnn.models import MODELS, arch_defaults, build_model

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("onecycle", "cosine", "constant")
DEFAULT_LR = {"sgd": 0.05, "adam": 2e-3}

#: A hook that turns a clean training batch into the batch the model is trained on (e.g. adversarial examples):
#: ``make_batch(model, x, y) -> (x', y')`` with x in [0, 1] on the training device.
BatchTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BatchPosition:
    """Which batch a training step is on: the samples' positions in the training set, the epoch (0-based) and the
    step within it (0-based, of ``steps``). Given to a ``batch_loss`` hook, e.g. to key per-sample randomness."""

    index: torch.Tensor
    epoch: int
    step: int
    steps: int


#: A hook that computes a batch's training loss instead of plain cross-entropy (adversarial training):
#: ``batch_loss(model, x, y, position, net) -> (mean loss, logits the running accuracy is measured on)``: attacks
#: use ``model``; the loss must come from one forward call of ``net`` (``model``, or DistributedDataParallel around
#: it, which allows one forward per backward).
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, BatchPosition, nn.Module],
                     tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's result. Stored in checkpoints as a plain dict."""

    model: str = "vgg"
    dataset: str = "fashion-mnist"
    epochs: int = 7
    batch_size: int = 128
    lr: float | None = None  # peak learning rate; None: 0.05 for SGD, 0.002 for Adam
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.2  # fraction of all steps spent warming up (onecycle)
    label_smoothing: float = 0.0
    augment: bool = False
    seed: int = 0
    limit: int | None = None  # train on the first `limit` training images only (quick tries, tests)
    arch_args: dict[str, Any] = field(default_factory=dict)
    # N(0, noise_sigma^2) added to every training image, not clamped (training for randomized smoothing); None: none
    noise_sigma: float | None = None
    # decay of an exponential moving average of the weights, which becomes the run's model; None: the raw weights
    ema: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise values once, here
        set_(self, "model", check_choice("model", self.model, MODELS))
        set_(self, "dataset", check_choice("dataset", self.dataset, DATASETS))
        set_(self, "optimizer", check_choice("optimizer", self.optimizer, OPTIMIZERS))
        set_(self, "schedule", check_choice("schedule", self.schedule, SCHEDULES))
        set_(self, "lr", DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr))
        unknown = set(self.arch_args) - set(arch_defaults(self.model))
        if unknown:
            raise UsageError(f"model {self.model} has no argument(s) {', '.join(sorted(unknown))}")
        set_(self, "arch_args", {**arch_defaults(self.model), **self.arch_args})
        for name in ("epochs", "batch_size", "lr", "limit"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"{name.replace('_', '-')} must be > 0, got {value}")
        if self.noise_sigma is not None:
            if isinstance(self.noise_sigma, bool) or not isinstance(self.noise_sigma, (int, float)) \
                    or not math.isfinite(self.noise_sigma) or self.noise_sigma <= 0:
                raise UsageError(f"--sigma must be a number > 0 for Gaussian noise, got {self.noise_sigma}")
            set_(self, "noise_sigma", float(self.noise_sigma))
        if self.ema is not None:
            if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0 < self.ema < 1:
                raise UsageError(f"--ema must be a decay in (0, 1), e.g. 0.999, got {self.ema}")
            set_(self, "ema", float(self.ema))
        if not (0 <= self.warmup < 1 and 0 <= self.label_smoothing < 1 and self.weight_decay >= 0 and self.momentum >= 0):
            raise UsageError("warmup and label smoothing must be in [0, 1), weight decay and momentum >= 0")

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict (what checkpoints store)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config a checkpoint stored (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class Progress:
    """What :func:`train` reports to its callbacks: running means over the epoch so far."""

    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based, within the epoch
    steps: int
    loss: float
    accuracy: float
    images_per_second: float
    seconds: float  # since the epoch began


@dataclass(frozen=True)
class Evaluation:
    """Clean accuracy of a model on a dataset."""

    accuracy: float
    loss: float
    count: int
    per_class_accuracy: dict[str, float]

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return asdict(self)


@dataclass
class TrainResult:
    """The trained model (eval mode) and the metadata stored in its checkpoint."""

    model: nn.Module
    meta: dict[str, Any]
    checkpoint: Path | None
    #: True when ``resume`` found the run already finished: nothing was trained, the checkpoint was left as it was.
    already_finished: bool = False

    @property
    def metrics(self) -> dict[str, Any]:
        """Test metrics of the finished run (identical for the same seed, device and thread count)."""
        return self.meta["metrics"]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed for one epoch, derived from the run's seed (stable across Python versions). Ranks other than
    0 of a distributed run get their own seed for augmentation and dropout (rank 0 keeps the one-process seed)."""
    text = f"robustcnn:{seed}:{epoch}" + (f":rank{rank}" if rank else "")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs (weight init, dropout) for a block and restore the caller's state afterwards."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _lr_factor(step: int, *, total: int, schedule: str, warmup: float) -> float:
    """Learning-rate multiplier at ``step``: one-cycle (linear warm-up, cosine down), cosine, or constant."""
    if schedule == "constant":
        return 1.0
    rise = int(total * warmup) if schedule == "onecycle" else 0
    if step < rise:
        return 0.04 + 0.96 * step / rise
    progress = (step - rise) / max(1, total - rise)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Run:
    """The mutable state of one training run: model, optimizer, LR schedule, history."""

    def __init__(self, config: TrainConfig, train_data: ImageData, device: torch.device,
                 dist: DistContext = SINGLE) -> None:
        self.config, self.device, self.dist = config, device, dist
        self.cuda = device.type == "cuda"
        self.steps = max(1, len(train_data) // config.batch_size)
        self.batch = min(config.batch_size, len(train_data))  # global: each rank takes batch // world_size of it
        self.local_batch = len(range(dist.rank, self.batch, dist.world_size))
        mean, std = channel_stats(train_data.images)
        self.meta = _model_meta(config, train_data, mean, std)
        with seeded(config.seed, device):
            model = build_model(config.model, in_channels=train_data.shape[0], image_size=train_data.shape[1],
                                num_classes=len(train_data.classes), mean=mean, std=std, **config.arch_args)
        self.model = model.to(device, memory_format=torch.channels_last)
        self.net = self.model  # what the steps call: the model, or DistributedDataParallel around it
        self.optimizer = _optimizer(config, self.model)
        total = config.epochs * self.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _lr_factor(s, total=total, schedule=config.schedule, warmup=config.warmup))
        # AMP in bfloat16 where the GPU has it: no loss scaling needed. Elsewhere (CPU, older GPUs) float32.
        self.amp = self.cuda and torch.cuda.is_bf16_supported()
        self.epochs_done = 0
        self.batch_loss: BatchLoss | None = None
        # Adversarial runs keep the best epoch's model (what the checkpoint holds); `model` trains on.
        self.kept: nn.Module | None = None
        self.trainer: AdversarialTraining | None = None
        # The moving average of the weights (config.ema) and how many steps it has taken in.
        self.ema: nn.Module | None = None
        self.ema_updates = 0
        if config.ema is not None:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)

    @property
    def shipped(self) -> nn.Module:
        """The weights the run stands for: the moving average when there is one, else the trained weights. They
        are what validation measures, what an adversarial run keeps, and what the checkpoint holds."""
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def _update_ema(self) -> None:
        """Move the average towards the current weights: ``avg += (1 - d) * (w - avg)`` for parameters and
        floating-point buffers (batch-norm statistics), counters copied. ``d`` is ``config.ema``, lowered early in
        the run to ``(1 + t) / (10 + t)`` after ``t`` steps so that the random initialisation is soon forgotten."""
        assert self.ema is not None and self.config.ema is not None
        t = self.ema_updates
        weight = 1.0 - min(self.config.ema, (1 + t) / (10 + t))
        pairs = zip((*self.ema.parameters(), *self.ema.buffers()), (*self.model.parameters(), *self.model.buffers()))
        for a, w in pairs:
            if a.is_floating_point():
                a.lerp_(w, weight)
            else:
                a.copy_(w)
        self.ema_updates = t + 1

    def resume_state(self, final: bool = False) -> dict[str, Any]:
        """What ``--resume`` needs; ``final``: for the finished run's file, without the adversarial training's
        per-image state (large, and nothing is left to train)."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "epoch": self.epochs_done}
        if self.kept is not None or self.ema is not None:  # the checkpoint holds other weights: save the live ones
            state["model"] = self.model.state_dict()
        if self.ema is not None:
            state["ema"], state["ema_updates"] = self.ema.state_dict(), self.ema_updates
        if self.trainer is not None and not final:
            extra = self.trainer.state_dict()
            if extra:
                state["adversarial"] = extra
        return state

    def restore(self, doc: dict[str, Any]) -> None:
        state = doc["resume"]
        self.model.load_state_dict(state.get("model", doc["model"]))
        if self.kept is not None:
            self.kept.load_state_dict(doc["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema", doc["model"]))
            self.ema_updates = int(state.get("ema_updates", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epochs_done = int(state["epoch"])
        if self.trainer is not None:
            self.trainer.load_state_dict(state.get("adversarial", {}), self.device)
        self.meta["history"] = list(doc["meta"].get("history", []))
        for key in ("kept_epoch", "overfitting"):
            if key in self.meta:
                self.meta[key] = copy.deepcopy(doc["meta"].get(key, self.meta[key]))

    def step(self, x: torch.Tensor, y: torch.Tensor,
             position: BatchPosition | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch; returns the detached summed loss and the number of correct predictions."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.batch_loss is not None:
                loss, logits = self.batch_loss(self.model, x, y, position, self.net)
            else:
                logits = self.net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self._update_ema()
        return loss.detach() * y.shape[0], (logits.detach().argmax(1) == y).sum()


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                           weight_decay=config.weight_decay)


def _model_meta(config: TrainConfig, data: ImageData, mean: list[float], std: list[float]) -> dict[str, Any]:
    """The checkpoint metadata that does not change during the run."""
    return {"architecture": config.model, "arch_args": dict(config.arch_args), "dataset": config.dataset,
            "input_shape": list(data.shape), "classes": list(data.classes),
            "normalization": {"mean": mean, "std": std}, "config": config.to_dict(), "seed": config.seed,
            "versions": versions(), "history": [], "epochs_done": 0, "complete": False, "metrics": {}}


def _run_epoch(run: _Run, data: ImageData, epoch: int, make_batch: BatchTransform | None,
               on_step: Callable[[Progress], None] | None, report_every: int) -> dict[str, float]:
    """Train one epoch (0-based ``epoch``): shuffle, index batches, augment on the device, step."""
    config, device, dist = run.config, run.device, run.dist
    generator = torch.Generator(device=device).manual_seed(epoch_seed(config.seed, epoch))
    order = torch.randperm(len(data), generator=generator, device=device)  # the same on every rank
    if dist.rank:  # each rank its own augmentation (and dropout) draws; rank 0 keeps the one-process ones
        generator.manual_seed(epoch_seed(config.seed, epoch, dist.rank))
    pad = 2 if data.shape[1] <= 28 else 4
    flip = horizontal_flip_is_sensible(data.name)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    run.model.train()
    start = time.perf_counter()
    with seeded(epoch_seed(config.seed, epoch, dist.rank), device):
        for step in range(run.steps):
            index = order[step * run.batch:(step + 1) * run.batch]
            if dist.enabled:  # this rank's share of the global batch
                index = index[dist.rank::dist.world_size]
            images, y = data.images[index], data.labels[index]
            if config.augment:
                images = augment(images, generator=generator, pad=pad, flip=flip)
            x = to_float(images).contiguous(memory_format=torch.channels_last)
            if config.noise_sigma is not None:
                x = add_gaussian_noise(x, config.noise_sigma, generator)
            if make_batch is not None:
                x, y = make_batch(run.model, x, y)
            batch_loss, batch_correct = run.step(x, y, BatchPosition(index, epoch, step, run.steps))
            loss_sum += batch_loss
            correct += batch_correct
            if on_step is not None and ((step + 1) % report_every == 0 or step + 1 == run.steps):
                on_step(_progress(epoch, config.epochs, step + 1, run, loss_sum, correct, start))
    if dist.enabled:  # epoch statistics over every rank's share
        dist.all_reduce_sum(loss_sum)
        dist.all_reduce_sum(correct)
    seen = run.steps * run.batch
    seconds = time.perf_counter() - start
    return {"epoch": epoch + 1, "train_loss": float(loss_sum) / seen, "train_accuracy": float(correct) / seen,
            "seconds": seconds, "images_per_second": seen / seconds}


def _progress(epoch: int, epochs: int, step: int, run: _Run, loss_sum: torch.Tensor, correct: torch.Tensor,
              start: float) -> Progress:
    seen, seconds = step * run.local_batch, time.perf_counter() - start  # this rank's running means
    return Progress(epoch + 1, epochs, step, run.steps, float(loss_sum) / seen, float(correct) / seen,
                    step * run.batch / max(seconds, 1e-9), seconds)


def evaluate(model: nn.Module, data: ImageData, *, device: str | torch.device = "cpu",
             batch_size: int = 250) -> Evaluation:
    """Clean accuracy, mean loss and per-class accuracy of ``model`` on ``data`` (under ``inference_mode``).

    ``model`` must already be on ``device``; its training mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    losses, predictions = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                x = to_float(data.images[start:start + batch_size], device).contiguous(memory_format=torch.channels_last)
                y = data.labels[start:start + batch_size].to(device)
                logits = model(x)
                losses.append(F.cross_entropy(logits.float(), y, reduction="sum"))
                predictions.append(logits.argmax(1))
    finally:
        model.train(was_training)
    predicted = torch.cat(predictions).cpu()
    labels = data.labels.cpu()
    hits = predicted == labels
    k = len(data.classes)
    totals = torch.bincount(labels, minlength=k)
    right = torch.bincount(labels[hits], minlength=k)
    per_class = {name: float(right[i]) / max(1, int(totals[i])) for i, name in enumerate(data.classes)}
    return Evaluation(float(hits.float().mean()), float(torch.stack(losses).sum()) / len(data), len(data), per_class)


def _resume(run: _Run, checkpoint: Path) -> TrainResult | None:
    """Load the resume state from ``checkpoint``, refusing one from a different configuration. In a distributed
    run rank 0 reads the file (it wrote it) and sends it to the other ranks.

    If ``checkpoint`` holds the run already finished, return it as it is (its model and metadata, nothing left to
    train or to write); else None, with ``run`` ready to go on from its last complete epoch."""
    doc = run.dist.on_main(lambda: _read_resumable(run, checkpoint))
    try:
        if doc["meta"].get("complete"):
            model = run.kept if run.kept is not None else run.model
            model.load_state_dict(doc["model"])
            return TrainResult(model.eval(), doc["meta"], checkpoint, already_finished=True)
        run.restore(doc)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume {checkpoint}: its state does not fit ({str(exc).splitlines()[0]})") from None
    return None


def _claim_checkpoint(checkpoint: Path, resume: bool, held: ExitStack) -> None:
    """Hold ``checkpoint`` for this run until ``held`` closes (:class:`OutputLock`: one writer per file) and, for a
    new run, refuse a file there that robustcnn did not write (resuming reads it, which refuses any other file)."""
    held.enter_context(OutputLock(checkpoint))
    if not resume:
        refuse_foreign(checkpoint)


def _read_resumable(run: _Run, checkpoint: Path) -> dict[str, Any]:
    if not checkpoint.is_file():
        raise CheckpointError(f"nothing to resume: {checkpoint} does not exist (drop --resume to start a new run)")
    doc = read_checkpoint(checkpoint)
    meta = doc["meta"]
    check_meta(checkpoint, meta, architecture=run.config.model, dataset=run.config.dataset)
    stored = meta.get("config", {})
    wanted = run.config.to_dict()
    changed = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    stored_adv = meta.get("adversarial")
    if stored_adv is not None:  # written by an older version: fill in the fields it did not have yet
        stored_adv = AdvConfig.from_dict(stored_adv).to_dict()
    if stored_adv != run.meta.get("adversarial"):
        changed.append(f"adversarial {stored_adv!r} -> {run.meta.get('adversarial')!r}")
    if changed:
        raise CheckpointError(f"cannot resume {checkpoint}: it was trained with other options ({'; '.join(changed)}); "
                              "use the same options, or drop --resume to start over")
    if doc.get("resume") is None:
        raise CheckpointError(f"cannot resume {checkpoint}: it holds no resume state")
    return doc


def train(
    config: TrainConfig,
    train_data: ImageData,
    test_data: ImageData,
    *,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    make_batch: BatchTransform | None = None,
    adversarial: AdvConfig | None = None,
    on_step: Callable[[Progress], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    report_every: int = 10,
    eval_batch_size: int = 250,
    dist: DistContext = SINGLE,
) -> TrainResult:
    """Train ``config.model`` on ``train_data``; evaluate on ``test_data``; return the model and its metadata.

    The data are moved to ``device`` once (uint8, one byte per pixel). With ``checkpoint``, the model and its
    resume state are saved there (atomically) after every epoch and once more with the final metrics; ``resume``
    continues from that file, which must come from the same config (a finished run is returned as it is, the file
    untouched: ``already_finished``). While the run lasts, the file is held with an :class:`OutputLock`, so a second
    run writing it fails at once (:class:`OutputBusyError`); a file there that robustcnn did not write is never
    replaced (:class:`ForeignFileError`). ``on_step`` gets a :class:`Progress` every
    ``report_every`` steps, ``on_epoch`` each finished epoch's statistics. ``make_batch`` may replace each clean
    batch by the batch to train on.

    ``adversarial`` trains for that threat model (see :mod:`robustcnn.advtrain`): the last
    ``adversarial.val_count`` training images are held out (before ``config.limit`` applies), each epoch's stats
    gain clean/PGD/FGSM accuracy on them and an ``overfitting`` diagnosis, and the checkpoint and the returned model
    are those of the epoch with the best PGD accuracy (``ibp``: IBP-verified accuracy; ``meta["kept_epoch"]``).

    Distributed (``dist`` from :func:`robustcnn.distributed.setup`, one call per rank): ``config.batch_size`` is
    the global batch, split evenly over the ranks (it must be divisible by their number); every rank draws the
    same shuffle and trains on its share of every batch in DistributedDataParallel, so gradients are averaged as
    over the whole batch. Only rank 0 writes the checkpoint and calls ``on_step``/``on_epoch``; the returned
    model is the unwrapped one on every rank. Adversarial runs attack each rank's share with the unwrapped model
    and validate on every rank (the same held-out images and weights, so every rank keeps the same epoch).
    """
    device = torch.device(device)
    for data in (train_data, test_data):
        if data.name != config.dataset:
            raise UsageError(f"config.dataset is {config.dataset!r} but the data given is {data.name!r}")
    if dist.enabled and config.batch_size % dist.world_size:
        raise UsageError(f"batch size {config.batch_size} is the global batch and must be divisible by the "
                         f"{dist.world_size} processes")
    if adversarial is not None and adversarial.init == "prior" and dist.enabled:
        raise UsageError("--adv-init prior keeps each training image's last perturbation in its process, and "
                         "the images move between processes every epoch: run it in one process")
    if resume and checkpoint is None:
        raise CheckpointError("nothing to resume: None does not exist (drop --resume to start a new run)")
    if not dist.is_main:
        on_step = on_epoch = None
    with ExitStack() as held:
        if checkpoint is not None:
            dist.on_main(lambda: _claim_checkpoint(Path(checkpoint), resume, held))
        trainer = held_out = None
        if adversarial is not None:
            train_data, held_out = split_held_out(train_data, adversarial.val_count)
        train_data = train_data.subset(config.limit).to(device)
        run = _Run(config, train_data, device, dist)
        if adversarial is not None:
            trainer = AdversarialTraining(adversarial, held_out.to(device), seed=config.seed,
                                          label_smoothing=config.label_smoothing, eval_batch_size=eval_batch_size,
                                          train_size=len(train_data))
            run.trainer = trainer
            probe = slice(0, min(8, len(train_data)))
            check_differentiable(run.model, to_float(train_data.images[probe]), train_data.labels[probe],
                                 adversarial.method)
            run.batch_loss, run.kept = trainer.loss, copy.deepcopy(run.model)
            run.meta.update(adversarial=adversarial.to_dict(), kept_epoch=0, overfitting=[])
        if resume:
            finished = _resume(run, Path(checkpoint))
            if finished is not None:
                return finished
        run.net = dist.wrap(run.model, device)
        for epoch in range(run.epochs_done, config.epochs):
            stats = _run_epoch(run, train_data, epoch, make_batch, on_step, report_every)
            run.epochs_done = epoch + 1
            run.meta["history"].append(stats)
            run.meta["epochs_done"] = run.epochs_done
            if trainer is not None:
                _validate_epoch(run, trainer, stats)
            if checkpoint is not None and dist.is_main:
                save_checkpoint(checkpoint, run.kept if run.kept is not None else run.shipped, run.meta,
                                run.resume_state())
            if on_epoch is not None:
                on_epoch(stats)
        return _finish(run, test_data, Path(checkpoint) if checkpoint is not None else None, eval_batch_size)


def _validate_epoch(run: _Run, trainer: AdversarialTraining, stats: dict[str, Any]) -> None:
    """Adversarial runs: add validation accuracies to the epoch's ``stats``, keep the model if it is the most robust
    so far (by ``trainer.kept_by``), and record catastrophic overfitting."""
    stats.update(trainer.validate(run.shipped, run.device))
    diagnosis = overfitting(run.meta["history"])
    stats["overfitting"] = diagnosis
    if diagnosis is not None:
        run.meta["overfitting"].append({"epoch": stats["epoch"], "message": diagnosis})
    kept, key = [h for h in run.meta["history"] if h["epoch"] == run.meta["kept_epoch"]], trainer.kept_by
    if not kept or stats[key] > kept[0][key]:
        run.kept.load_state_dict(run.shipped.state_dict())
        run.meta["kept_epoch"] = stats["epoch"]


def _finish(run: _Run, test_data: ImageData, checkpoint: Path | None, eval_batch_size: int) -> TrainResult:
    """Evaluate on the test set, store metrics and timing, write the final checkpoint."""
    model = run.kept if run.kept is not None else run.shipped
    result = evaluate(model, test_data, device=run.device, batch_size=eval_batch_size)
    history = run.meta["history"]
    last = history[-1] if history else {}
    seconds = sum(h["seconds"] + h.get("val_seconds", 0.0) for h in history)
    images = sum(h["images_per_second"] * h["seconds"] for h in history)
    run.meta.update(
        complete=True,
        metrics={"test_accuracy": result.accuracy, "test_loss": result.loss, "test_count": result.count,
                 "per_class_accuracy": result.per_class_accuracy, "train_loss": last.get("train_loss"),
                 "train_accuracy": last.get("train_accuracy")},
        timing={"train_seconds": seconds, "images_per_second": images / seconds if seconds else 0.0,
                "device": str(run.device), "threads": torch.get_num_threads(), "processes": run.dist.world_size},
    )
    if run.kept is not None:
        kept = next(h for h in history if h["epoch"] == run.meta["kept_epoch"])
        run.meta["metrics"].update(
            kept_epoch=run.meta["kept_epoch"], val_robust_accuracy=kept["val_robust_accuracy"],
            val_clean_accuracy=kept["val_clean_accuracy"], val_fgsm_accuracy=kept["val_fgsm_accuracy"],
            overfitting=run.meta["overfitting"][0]["message"] if run.meta["overfitting"] else None)
        if "val_verified_accuracy" in kept:
            run.meta["metrics"]["val_verified_accuracy"] = kept["val_verified_accuracy"]
    if checkpoint is not None and run.dist.is_main:
        save_checkpoint(checkpoint, model, run.meta, run.resume_state(final=True))
    model.eval()
    return TrainResult(model, run.meta, checkpoint)
