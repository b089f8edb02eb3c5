"""`robustcnn train` and `robustcnn eval`."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.progress import TextColumn
from rich.table import Table

from cli import output
from cli.app import app
from cli.distributed import refuse_distributed, session
from cli.options import BatchSize, Checkpoint, DataDir, Device, Json, Seed, positive
from robustcnn.checkpoint import latest_checkpoint, load_model, record_latest
from robustcnn.data import DATASETS, load_dataset
from robustcnn.device import default_batch_size, resolve_device
from robustcnn.errors import RobustCNNError
from robustcnn.models import MODELS
from robustcnn.perf import keep_freed_memory
from robustcnn.train import OPTIMIZERS, Progress, TrainConfig, evaluate, train

TRAINING = "Training"
SAVING = "Checkpoint"


class Interrupted(RobustCNNError):
    """Ctrl-C or SIGTERM during training (exit code 130, like a shell)."""

    exit_code = 130


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM stop training the way Ctrl-C does (the last complete checkpoint stays as it is)."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


@app.command("train")
def train_command(
    model: Annotated[str, typer.Option("--model", "-m", help=f"Architecture: {', '.join(MODELS)}.",
                                       rich_help_panel=TRAINING)] = TrainConfig.model,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=f"Dataset: {', '.join(DATASETS)}.",
                                         rich_help_panel=TRAINING)] = TrainConfig.dataset,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Passes over the training set.",
                                        rich_help_panel=TRAINING)] = TrainConfig.epochs,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: 0.05 for sgd, 0.002 for adam).",
                                                rich_help_panel=TRAINING)] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help=f"Optimizer: {', '.join(OPTIMIZERS)}.",
                                           rich_help_panel=TRAINING)] = TrainConfig.optimizer,
    augment: Annotated[bool, typer.Option("--augment", help="Random crops (zero padding 2-4 px) and, where sensible, "
                                          "horizontal flips, applied per batch on the device.",
                                          rich_help_panel=TRAINING)] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on the first N training images only "
                                                 "(quick tries). Default: all.", rich_help_panel=TRAINING)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the checkpoint, saved as "
                                      "<dataset>-<model>.pt after every epoch.", rich_help_panel=SAVING)] = Path("runs"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last "
                                         "complete epoch (same options required).", rich_help_panel=SAVING)] = False,
    seed: Seed = 0,
    device: Device = "auto",
    batch_size: BatchSize = None,
    data_dir: DataDir = None,
    json_mode: Json = False,
) -> None:
    """Train a CNN on real data (Fashion-MNIST by default), save it, and record it as the newest run.

    Under torchrun (`torchrun --nproc_per_node N -m cli train ...`) it trains with DistributedDataParallel:
    --batch-size is the global batch, split over the N processes; rank 0 alone writes and prints.
    """
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--lr", lr), ("--limit", limit)):
        positive(name, value)
    with session(device) as (ctx, dev):
        _train(ctx, dev, model, dataset, epochs, lr, optimizer, augment, limit, out, resume, seed, batch_size,
               data_dir, json_mode)


def _train(ctx, dev, model, dataset, epochs, lr, optimizer, augment, limit, out, resume, seed, batch_size, data_dir,
           json_mode) -> None:
    keep_freed_memory()
    config = TrainConfig(model=model, dataset=dataset, epochs=epochs, lr=lr, optimizer=optimizer, augment=augment,
                         seed=seed, limit=limit, batch_size=batch_size or default_batch_size(dev, training=True))
    path = out / f"{config.dataset}-{config.model}.pt"
    train_data = ctx.main_first(lambda: load_dataset(config.dataset, train=True, data_dir=data_dir))
    test_data = ctx.main_first(lambda: load_dataset(config.dataset, train=False, data_dir=data_dir))
    done = {"epochs": 0}
    fields = [TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("acc {task.fields[acc]:.2%}"),
              TextColumn("{task.fields[speed]:,.0f} img/s")]
    try:
        with _sigterm_interrupts(), output.progress(json_mode or not ctx.is_main, *fields) as bar:
            task = bar.add_task("training", total=None, loss=float("nan"), acc=0.0, speed=0.0)

            def on_step(p: Progress) -> None:
                bar.update(task, description=f"epoch {p.epoch}/{p.epochs}", total=p.epochs * p.steps,
                           completed=(p.epoch - 1) * p.steps + p.step, loss=p.loss, acc=p.accuracy,
                           speed=p.images_per_second)

            result = train(config, train_data, test_data, device=dev, checkpoint=path, resume=resume,
                           on_step=on_step, on_epoch=lambda stats: done.update(epochs=stats["epoch"]), dist=ctx)
    except KeyboardInterrupt:
        kept = f"{path} holds epoch {done['epochs']}" if done["epochs"] else "no epoch was completed"
        raise Interrupted(f"interrupted: {kept}; rerun with --resume to continue") from None
    if ctx.is_main:
        record_latest(path, result.meta)
        _report_training(result.meta, path, json_mode)


def _report_training(meta: dict[str, Any], path: Path, json_mode: bool) -> None:
    metrics, timing = meta["metrics"], meta["timing"]
    if json_mode:
        output.emit_json({"checkpoint": str(path), "model": meta["architecture"], "dataset": meta["dataset"],
                          "epochs": meta["epochs_done"], "metrics": metrics, "timing": timing,
                          "config": meta["config"], "history": meta["history"]})
        return
    table = Table(title=f"{meta['architecture']} on {meta['dataset']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("test accuracy", _percent(metrics["test_accuracy"]))
    table.add_row("epochs", str(meta["epochs_done"]))
    table.add_row("training time", _duration(timing["train_seconds"]))
    table.add_row("throughput", f"{timing['images_per_second']:,.0f} img/s on {timing['device']}")
    table.add_row("checkpoint", str(path))
    output.stdout.print(table)


@app.command("eval")
def eval_command(
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    batch_size: BatchSize = None,
    data_dir: DataDir = None,
    json_mode: Json = False,
) -> None:
    """Clean test accuracy (overall and per class) of a checkpoint; the newest run's by default."""
    refuse_distributed("eval")
    positive("--batch-size", batch_size)
    dev = resolve_device(device)
    keep_freed_memory()
    path = checkpoint if checkpoint is not None else latest_checkpoint()
    model, meta = load_model(path, dev)
    data = load_dataset(meta["dataset"], train=False, data_dir=data_dir)
    if list(data.shape) != list(meta["input_shape"]) or list(data.classes) != list(meta["classes"]):
        raise RobustCNNError(f"{path} was trained on {meta['input_shape']} images of {len(meta['classes'])} classes, "
                             f"but {meta['dataset']} here has {list(data.shape)} and {len(data.classes)}")
    result = evaluate(model, data, device=dev, batch_size=batch_size or default_batch_size(dev, training=False))
    if json_mode:
        output.emit_json({"checkpoint": str(path), "model": meta["architecture"], "dataset": meta["dataset"],
                          **result.to_dict()})
        return
    table = Table(title=f"{meta['architecture']} on {meta['dataset']} test set ({result.count:,} images)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in result.per_class_accuracy.items():
        table.add_row(name, _percent(acc))
    table.add_section()
    table.add_row("[bold]all[/]", f"[bold]{_percent(result.accuracy)}[/]")
    output.stdout.print(table)
    output.stdout.print(f"checkpoint: {path}", highlight=False)
