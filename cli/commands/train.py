"""`robustcnn train` and `robustcnn eval`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.progress import TextColumn
from rich.table import Table

from cli import output
from cli.distributed import refuse_distributed, session, sigterm_interrupts
from cli.options import BatchSize, Checkpoint, DataDir, Device, Json, Seed, parse_eps, positive
from cli.sources import (Classes, DataChoice, DataSpec, Grayscale, ImageSize, LogitsFromProbs, Mean, ModelChoice,
                         ModelSpec, OutputIndex, Split, Std, Weights, load_sources, model_label)
from robustcnn.advtrain import DEFAULT_EPOCHS, DEFAULT_STEPS, METHODS, RECIPES, AdvConfig, Recipe
from robustcnn.checkpoint import record_latest
from robustcnn.data import DATASETS, load_dataset
from robustcnn.device import default_batch_size, resolve_device
from robustcnn.distributed import DistContext
from robustcnn.errors import RobustCNNError, UsageError, check_choice
from robustcnn.models import MODELS
from robustcnn.perf import keep_freed_memory
from robustcnn.report import usual_eps
from robustcnn.train import OPTIMIZERS, Progress, TrainConfig, evaluate, train

TRAINING = "Training"
ADVERSARIAL = "Adversarial training"
SAVING = "Checkpoint"


class Interrupted(RobustCNNError):
    """Ctrl-C or SIGTERM during training (exit code 130, like a shell)."""

    exit_code = 130


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


#: What a run without --adv trains with where the options are not given.
_PLAIN = Recipe(TrainConfig.model, TrainConfig.optimizer, TrainConfig.epochs)
_PGD = RECIPES["pgd"]


def _arch_text(arch: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in arch.items())


def train_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=f"Architecture: {', '.join(MODELS)}. Default: "
                                                 f"{TrainConfig.model}; with --adv pgd {_PGD.model} "
                                                 f"({_arch_text(_PGD.arch)}).", rich_help_panel=TRAINING,
                                                 show_default=False)] = None,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=f"Dataset: {', '.join(DATASETS)}.",
                                         rich_help_panel=TRAINING)] = TrainConfig.dataset,
    epochs: Annotated[Optional[int], typer.Option("--epochs", "-e", help=f"Passes over the training set. Default: "
                                                  f"{TrainConfig.epochs}; with --adv pgd {DEFAULT_EPOCHS['pgd']}, "
                                                  f"ibp {DEFAULT_EPOCHS['ibp']}, other methods "
                                                  f"{DEFAULT_EPOCHS['fast']}.",
                                                  rich_help_panel=TRAINING, show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: 0.05 for sgd, 0.002 for adam).",
                                                rich_help_panel=TRAINING)] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help=f"Optimizer: {', '.join(OPTIMIZERS)}. "
                                                     f"Default: {TrainConfig.optimizer}; with --adv pgd "
                                                     f"{_PGD.optimizer}.", rich_help_panel=TRAINING,
                                                     show_default=False)] = None,
    augment: Annotated[bool, typer.Option("--augment", help="Random crops (zero padding 2-4 px) and, where sensible, "
                                          "horizontal flips, applied per batch on the device.",
                                          rich_help_panel=TRAINING)] = False,
    arch: Annotated[Optional[str], typer.Option("--arch", help="The architecture's own settings as KEY=VALUE,... "
                                                "(simple: width, hidden; vgg: width, convs, dropout; resnet: width, "
                                                "blocks), e.g. width=64.", rich_help_panel=TRAINING,
                                                show_default=False)] = None,
    ema: Annotated[Optional[float], typer.Option("--ema", help="Keep an exponential moving average of the weights "
                                                 "with this decay (e.g. 0.999) and make it the trained model: it "
                                                 "is what is validated, kept and saved. 0: none. Default: none; "
                                                 f"with --adv pgd {_PGD.ema}.", rich_help_panel=TRAINING,
                                                 show_default=False)] = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the "
                                                   "cross-entropy, in [0, 1).",
                                                   rich_help_panel=TRAINING)] = TrainConfig.label_smoothing,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on the first N training images only "
                                                 "(quick tries). Default: all.", rich_help_panel=TRAINING)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the checkpoint, saved as "
                                      "<dataset>-<model>.pt after every epoch.", rich_help_panel=SAVING)] = Path("runs"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last "
                                         "complete epoch (same options required); a finished run is reported "
                                         "as it is.", rich_help_panel=SAVING)] = False,
    adv: Annotated[Optional[str], typer.Option("--adv", help="Adversarial training: pgd (Madry et al.), trades "
                                               "(Zhang et al.), fast (FGSM with random start, Wong et al.), mart "
                                               "(Wang et al.) or ibp (interval bounds, Gowal et al.; verifiable). "
                                               "Keeps the epoch most robust on held-out training images.", rich_help_panel=ADVERSARIAL, show_default=False)] = None,
    eps: Annotated[Optional[str], typer.Option("--eps", help="Budget to train for, in [0, 1] pixel units: 0.1 or "
                                               "8/255. Default: the dataset's usual Linf budget (Fashion-MNIST 0.1).",
                                               rich_help_panel=ADVERSARIAL, show_default=False)] = None,
    adv_norm: Annotated[str, typer.Option("--adv-norm", help="Norm of the budget: linf or l2.",
                                          rich_help_panel=ADVERSARIAL)] = "linf",
    adv_steps: Annotated[Optional[int], typer.Option("--adv-steps", help=f"Attack steps per batch. Default: "
                                                     f"{DEFAULT_STEPS['pgd']} (fast: 1).",
                                                     rich_help_panel=ADVERSARIAL, show_default=False)] = None,
    adv_alpha: Annotated[Optional[str], typer.Option("--adv-alpha", help="Attack step size in pixel units. Default: "
                                                     "2.5 * eps / steps (fast: 1.25 * eps; with --adv-init prior "
                                                     "0.5 * eps).", rich_help_panel=ADVERSARIAL,
                                                     show_default=False)] = None,
    adv_init: Annotated[str, typer.Option("--adv-init", help="Where each batch's attack starts: random (in the "
                                          "ball) or prior (each image's perturbation from its previous epoch, so "
                                          "the steps add up over epochs; one byte per training pixel; one process "
                                          "only).", rich_help_panel=ADVERSARIAL)] = AdvConfig.init,
    beta: Annotated[Optional[float], typer.Option("--beta", help="Weight of the robustness term of trades and mart. "
                                                  "Default: 6.", rich_help_panel=ADVERSARIAL, show_default=False)] = None,
    eps_warmup: Annotated[float, typer.Option("--eps-warmup", help="Epochs over which the training budget rises "
                                              "linearly from 0 to --eps (0: none).",
                                              rich_help_panel=ADVERSARIAL)] = 0.0,
    noise: Annotated[Optional[str], typer.Option("--noise", help="Noise added to every training image: gaussian "
                                                 "(N(0, sigma^2), not clamped; trains for `robustcnn certify --method "
                                                 "smoothing`).", rich_help_panel=TRAINING, show_default=False)] = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", help="Standard deviation of --noise gaussian, in pixel "
                                                   "units of [0, 1] images, e.g. 0.25.", rich_help_panel=TRAINING,
                                                   show_default=False)] = None,
    adv_val: Annotated[int, typer.Option("--adv-val", help="Training images held out (never trained on) to measure "
                                         "clean, PGD-10 and FGSM accuracy after every epoch.",
                                         rich_help_panel=ADVERSARIAL)] = AdvConfig.val_count,
    seed: Seed = 0,
    device: Device = "auto",
    batch_size: BatchSize = None,
    data_dir: DataDir = None,
    json_mode: Json = False,
) -> None:
    """Train a CNN on real data (Fashion-MNIST by default), save it, and record it as the newest run.

    With --adv, train it to resist attacks within --eps (adversarial training) instead.

    Under torchrun (`torchrun --nproc_per_node N -m cli train ...`) it trains with DistributedDataParallel:
    --batch-size is the global batch, split over the N processes; rank 0 alone writes and prints.
    """
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--lr", lr), ("--limit", limit)):
        positive(name, value)
    adversarial = _adversarial_config(dataset, method=adv, eps=eps, norm=adv_norm, steps=adv_steps, alpha=adv_alpha,
                                      beta=beta, warmup=eps_warmup, val=adv_val, init=adv_init)
    noise_sigma = _noise_sigma(noise, sigma, adversarial)
    recipe = RECIPES[adversarial.method] if adversarial is not None else _PLAIN
    arch_args = parse_arch(arch)
    if model is None:  # the recipe's architecture, with its own settings under those given
        model, arch_args = recipe.model, {**recipe.arch, **arch_args}
    if ema is None:
        ema = recipe.ema
    elif ema == 0:
        ema = None
    with session(device) as (ctx, dev):
        config = TrainConfig(model=model, dataset=dataset, epochs=epochs or recipe.epochs, lr=lr,
                             optimizer=optimizer or recipe.optimizer, augment=augment, seed=seed, limit=limit,
                             arch_args=arch_args, ema=ema,
                             label_smoothing=label_smoothing,
                             batch_size=batch_size or default_batch_size(dev, training=True), noise_sigma=noise_sigma)
        suffix = f"-{adversarial.method}" if adversarial is not None else ("-gaussian" if noise_sigma else "")
        _train(ctx, dev, config, adversarial, checkpoint=out / f"{config.dataset}-{config.model}{suffix}.pt",
               resume=resume, data_dir=data_dir, json_mode=json_mode)


def parse_arch(text: str | None) -> dict[str, Any]:
    """``--arch width=64,convs=2`` as ``{"width": 64, "convs": 2}`` (integers, else decimals); usage errors for
    anything else. Which keys the architecture has is checked when the config is built."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UsageError(f"--arch takes KEY=VALUE pairs separated by commas, got {item.strip()!r}")
        if key in out:
            raise UsageError(f"--arch {key} is given twice")
        try:
            number: int | float = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"--arch {key} must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0:
            raise UsageError(f"--arch {key} must be a finite number >= 0, got {value!r}")
        out[key] = number
    return out


def _noise_sigma(noise: str | None, sigma: float | None, adversarial: AdvConfig | None) -> float | None:
    """--noise/--sigma as TrainConfig.noise_sigma (None: no noise); usage errors for anything inconsistent."""
    if noise is None:
        if sigma is not None:
            raise UsageError("--sigma only applies to --noise gaussian")
        return None
    check_choice("noise", noise, ("gaussian",))
    if sigma is None or not sigma > 0 or sigma == float("inf"):
        raise UsageError(f"--noise gaussian needs --sigma > 0 (pixel units), got {sigma}")
    if adversarial is not None:
        raise UsageError("--noise and --adv do not combine: train for randomized smoothing or adversarially")
    return float(sigma)


def _train(ctx: DistContext, dev: torch.device, config: TrainConfig, adversarial: Optional[AdvConfig], *,
           checkpoint: Path, resume: bool, data_dir: Optional[Path], json_mode: bool) -> None:
    """Train ``config`` (adversarially with ``adversarial``) into ``checkpoint`` with a progress bar; record the
    finished run as the newest and print its summary (rank 0)."""
    train_data = ctx.main_first(lambda: load_dataset(config.dataset, train=True, data_dir=data_dir))
    test_data = ctx.main_first(lambda: load_dataset(config.dataset, train=False, data_dir=data_dir))
    done = {"epochs": 0}
    fields = [TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("acc {task.fields[acc]:.2%}"),
              TextColumn("{task.fields[speed]:,.0f} img/s")]
    try:
        with sigterm_interrupts(), output.progress(json_mode or not ctx.is_main, *fields) as bar:
            task = bar.add_task("training", total=None, loss=float("nan"), acc=0.0, speed=0.0)

            def on_step(p: Progress) -> None:
                bar.update(task, description=f"epoch {p.epoch}/{p.epochs}", total=p.epochs * p.steps,
                           completed=(p.epoch - 1) * p.steps + p.step, loss=p.loss, acc=p.accuracy,
                           speed=p.images_per_second)

            def on_epoch(stats: dict[str, Any]) -> None:
                done.update(epochs=stats["epoch"])
                if adversarial is not None:
                    _report_epoch(stats, config.epochs, json_mode)

            result = train(config, train_data, test_data, device=dev, checkpoint=checkpoint, resume=resume,
                           adversarial=adversarial, on_step=on_step, on_epoch=on_epoch, dist=ctx)
    except KeyboardInterrupt:
        kept = f"{checkpoint} holds epoch {done['epochs']}" if done["epochs"] else "no epoch was completed"
        raise Interrupted(f"interrupted: {kept}; rerun with --resume to continue") from None
    if ctx.is_main:
        if result.already_finished:
            output.stderr.print(f"{checkpoint} holds a finished run: nothing to resume; it is left as it is", highlight=False)
        record_latest(checkpoint, result.meta)
        _report_training(result.meta, checkpoint, json_mode)


def _adversarial_config(dataset: str, *, method: str | None, eps: str | None, norm: str, steps: int | None,
                        alpha: str | None, beta: float | None, warmup: float, val: int,
                        init: str = AdvConfig.init) -> AdvConfig | None:
    """The --adv options as an :class:`AdvConfig` (None without --adv); usage errors for anything inconsistent."""
    if method is None:
        given = [flag for flag, value, unset in (("--eps", eps, None), ("--adv-norm", norm, "linf"),
                                                 ("--adv-steps", steps, None), ("--adv-alpha", alpha, None),
                                                 ("--beta", beta, None), ("--eps-warmup", warmup, 0.0),
                                                 ("--adv-val", val, AdvConfig.val_count),
                                                 ("--adv-init", init, AdvConfig.init)) if value != unset]
        if given:
            raise UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to adversarial "
                             f"training: add --adv {'|'.join(METHODS)}")
        return None
    if eps is None:
        if str(norm).strip().lower() != "linf":
            raise UsageError(f"--adv-norm {norm} needs an explicit --eps (in [0, 1] pixel units)")
        eps = usual_eps(str(dataset), "linf")  # the budget reports use for the dataset
    budget = parse_eps(eps, norm)
    if budget <= 0:
        raise UsageError(f"--eps must be > 0 for adversarial training, got {eps}")
    step = None
    if alpha is not None:
        try:
            step = parse_eps(alpha, norm)
        except UsageError:
            raise UsageError(f"invalid --adv-alpha {alpha!r}: write a number > 0 such as 0.02 or 2/255") from None
    return AdvConfig(method=method, eps=budget, norm=norm, steps=steps, alpha=step, beta=beta, eps_warmup=warmup,
                     val_count=val, init=init)


def _report_epoch(stats: dict[str, Any], epochs: int, json_mode: bool) -> None:
    """One line per epoch of an adversarial run (stderr): clean and robust held-out accuracy; overfitting warnings."""
    if not json_mode:
        output.stderr.print(
            f"epoch {stats['epoch']}/{epochs}: train loss {stats['train_loss']:.4f}, held-out accuracy clean "
            f"{_percent(stats['val_clean_accuracy'])}, PGD {_percent(stats['val_robust_accuracy'])}, FGSM "
            f"{_percent(stats['val_fgsm_accuracy'])}"
            + (f", IBP-verified {_percent(stats['val_verified_accuracy'])}" if "val_verified_accuracy" in stats else ""),
            highlight=False)
    if stats.get("overfitting"):
        output.stderr.print(f"[bold yellow]warning:[/] {stats['overfitting']}; the checkpoint keeps the most robust "
                            "epoch", highlight=False)


def _threat_model(adv: dict[str, Any]) -> str:
    norm = {"linf": "Linf", "l2": "L2"}[adv["norm"]]
    prior = adv.get("init") == "prior"
    if adv["method"] == "ibp":
        return (f"ibp: {norm} eps {adv['eps']:.4g}, interval bounds, eps and kappa ramped over "
                f"{adv['eps_warmup']:g} epochs")
    if adv["method"] == "fast":
        steps = "FGSM from the previous epoch's perturbation" if prior else "FGSM + random start"
    else:
        steps = f"{adv['steps']} steps" + (" from the previous epoch's perturbation" if prior else "")
    beta = f", beta {adv['beta']:g}" if adv.get("beta") is not None else ""
    warm = f", eps warm-up {adv['eps_warmup']:g} epochs" if adv.get("eps_warmup") else ""
    return f"{adv['method']}: {norm} eps {adv['eps']:.4g}, {steps}, alpha {adv['alpha']:.4g}{beta}{warm}"


def _report_training(meta: dict[str, Any], path: Path, json_mode: bool) -> None:
    metrics, timing = meta["metrics"], meta["timing"]
    adv = meta.get("adversarial")
    if json_mode:
        doc = {"checkpoint": str(path), "model": meta["architecture"], "dataset": meta["dataset"],
               "epochs": meta["epochs_done"], "metrics": metrics, "timing": timing,
               "config": meta["config"], "history": meta["history"]}
        if adv is not None:
            doc.update(adversarial=adv, kept_epoch=meta["kept_epoch"], overfitting=meta["overfitting"])
        output.emit_json(doc)
        return
    table = Table(title=f"{meta['architecture']} on {meta['dataset']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    if adv is not None:
        table.add_row("adversarial training", _threat_model(adv))
    if meta["config"].get("noise_sigma"):
        table.add_row("noise", f"gaussian, sigma {meta['config']['noise_sigma']:g} (for randomized smoothing)")
    if meta["config"].get("ema"):
        table.add_row("weights", f"moving average, decay {meta['config']['ema']:g}")
    table.add_row("test accuracy", _percent(metrics["test_accuracy"]))
    if adv is not None:
        table.add_row("robust accuracy", f"{_percent(metrics['val_robust_accuracy'])} (PGD-{adv['val_steps']} on "
                      f"{adv['val_count']:,} held-out training images)")
        if "val_verified_accuracy" in metrics:
            table.add_row("verified accuracy", f"{_percent(metrics['val_verified_accuracy'])} (IBP, same images)")
        table.add_row("kept epoch", f"{meta['kept_epoch']} (most robust on the held-out images)")
        if metrics.get("overfitting"):
            table.add_row("[yellow]warning[/]", metrics["overfitting"])
    table.add_row("epochs", str(meta["epochs_done"]))
    table.add_row("training time", _duration(timing["train_seconds"]))
    table.add_row("throughput", f"{timing['images_per_second']:,.0f} img/s on {timing['device']}")
    table.add_row("checkpoint", str(path))
    output.stdout.print(table)


def eval_command(
    checkpoint: Checkpoint = None,
    model_spec: ModelSpec = None,
    weights: Weights = None,
    mean: Mean = None,
    std: Std = None,
    output_index: OutputIndex = None,
    logits_from_probs: LogitsFromProbs = False,
    data: DataSpec = None,
    split: Split = "test",
    image_size: ImageSize = None,
    grayscale: Grayscale = False,
    classes: Classes = None,
    n: Annotated[Optional[int], typer.Option("--n", "-n", "--limit", help="Evaluate only the first N images of "
                                             "the split (default: all).", show_default=False)] = None,
    device: Device = "auto",
    batch_size: BatchSize = None,
    data_dir: DataDir = None,
    json_mode: Json = False,
) -> None:
    """Clean test accuracy (overall and per class) of a model; the newest run's by default."""
    refuse_distributed("eval")
    positive("--n", n)
    positive("--batch-size", batch_size)
    dev = resolve_device(device)
    keep_freed_memory()
    models = ModelChoice(model_spec, checkpoint, weights, mean, std, output_index, logits_from_probs)
    model, meta, data = load_sources(models, DataChoice(data, split, image_size, grayscale, classes, data_dir), dev,
                                     limit=n)
    result = evaluate(model, data, device=dev, batch_size=batch_size or default_batch_size(dev, training=False))
    if json_mode:
        output.emit_json({"checkpoint": model_label(meta), "model": meta.get("architecture"), "dataset": data.name,
                          **result.to_dict()})
        return
    name = meta.get("architecture") or model_label(meta)
    table = Table(title=f"{name} on {data.name} {split} set ({result.count:,} images)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in result.per_class_accuracy.items():
        table.add_row(name, _percent(acc))
    table.add_section()
    table.add_row("[bold]all[/]", f"[bold]{_percent(result.accuracy)}[/]")
    output.stdout.print(table)
    output.stdout.print(f"model: {model_label(meta)}", highlight=False)
