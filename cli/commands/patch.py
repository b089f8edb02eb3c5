"""`robustcnn patch train`: train universal adversarial patches, save them, and measure them on held-out images.

The patch files and the measurement are library code: :mod:`robustcnn.patches`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.table import Table

from attacks.patch import SHAPES, PatchTraining, patch_footprints, train_patch
from cli import output
from cli.distributed import refuse_distributed
from cli.options import BatchSize, Checkpoint, DataDir, Device, Json, Seed, positive
from cli.sources import (Classes, DataChoice, DataSpec, Grayscale, ImageSize, LogitsFromProbs, Mean, ModelChoice,
                         ModelSpec, OutputIndex, Split, Std, Weights, load_sources, model_label)
from robustcnn.errors import UsageError
from robustcnn.patches import TENSOR_SUFFIXES, measure_patch, save_patch
from robustcnn.fsutil import claim_outputs
from robustcnn.perf import keep_freed_memory

PATCH = "Patch options"

patch_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Universal adversarial patches (Brown et al. 2017): train, save, measure on held-out images.",
)


# -- the command ---------------------------------------------------------------------------------------------------
def parse_areas(text: str) -> list[float]:
    """``0.05`` or ``0.01,0.02,0.05,0.1``: patch areas as fractions of the image, each in (0, 1)."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"invalid --area {part!r}: write a fraction of the image such as 0.05") from None
        if not 0.0 < value < 1.0:
            raise UsageError(f"invalid --area {part!r}: a patch covers a fraction of the image in (0, 1)")
        values.append(value)
    return values


def parse_shape(text: str):
    """``auto``, ``square`` or ``ROWSxCOLS`` (``13x3``): the patch's rectangle (see
    :func:`attacks.patch.patch_footprints`)."""
    text = text.strip().lower()
    if text in SHAPES:
        return text
    rows, sep, cols = text.partition("x")
    if sep and rows.isdigit() and cols.isdigit():
        return int(rows), int(cols)
    raise UsageError(f"invalid --shape {text!r}: write auto, square or ROWSxCOLS such as 13x3")


def _default_stem(out: Optional[Path], dataset: str, area: float, target: Optional[int], several: bool) -> Path:
    name = f"{dataset}-patch-{area * 100:g}pct" + ("" if target is None else f"-target{target}")
    if out is None:
        return Path("runs") / name
    stem = out.with_suffix("") if out.suffix.lower() in (".png", *TENSOR_SUFFIXES) else out
    return stem.with_name(f"{stem.name}-{area * 100:g}pct") if several else stem


@patch_app.command("train")
def train_cmd(
    area: Annotated[str, typer.Option("--area", help="Patch area as a fraction of the image, in (0, 1); a list "
                                      "(0.01,0.02,0.05,0.1) trains one patch per area.", rich_help_panel=PATCH)] = "0.05",
    target: Annotated[Optional[int], typer.Option("--target", help="Targeted: push every image towards this class "
                                                  "index. Default: untargeted.", rich_help_panel=PATCH)] = None,
    shape: Annotated[str, typer.Option("--shape", help="The patch's rectangle: auto (a short trial of every "
                                       "rectangle the area allows, sides at most 1:5, and the best one trained), "
                                       "square (the near-square one only), or ROWSxCOLS such as 13x3.",
                                       rich_help_panel=PATCH)] = "auto",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps (one minibatch each).",
                                       rich_help_panel=PATCH)] = PatchTraining.steps,
    refine: Annotated[int, typer.Option("--refine", help="Sweeps of discrete search after the gradient steps "
                                        "(each tries the most promising one-pixel changes; 0: none).",
                                        rich_help_panel=PATCH)] = PatchTraining.refine,
    sink: Annotated[bool, typer.Option("--sink/--no-sink", help="Untargeted: pull every image towards the one class "
                                       "whose short trial fools the most training images (stronger than pushing "
                                       "each image away from its own class).", rich_help_panel=PATCH)] = PatchTraining.sink,
    train_images: Annotated[int, typer.Option("--train-images", help="Training images the patch is trained on.",
                                              rich_help_panel=PATCH)] = 10000,
    n: Annotated[int, typer.Option("--n", help="Held-out test images the patch is measured on.",
                                   rich_help_panel=PATCH)] = 2000,
    draws: Annotated[int, typer.Option("--draws", help="Places per test image: the figures are means over this "
                                       "many random placements, the drop with its standard deviation over them.",
                                       rich_help_panel=PATCH)] = 4,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to save: writes OUT.png and OUT.pt "
                                                "(default runs/<dataset>-patch-<area>pct[-target<k>]).")] = None,
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
    data_dir: DataDir = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: Json = False,
) -> None:
    """Train a universal adversarial patch, save it (PNG + .pt) and measure it on held-out images.

    The patch is trained on training images with random location, scale and rotation, then pasted at random
    locations on test images; as the control ("noise"), every test image also gets a same-size patch of uniform
    random values (a fresh one per image) at a random location.
    """
    refuse_distributed("patch train")
    areas = parse_areas(area)
    _check_counts(steps=steps, train_images=train_images, n=n, draws=draws, batch_size=batch_size, refine=refine)
    models = ModelChoice(model_spec, checkpoint, weights, mean, std, output_index, logits_from_probs)
    datas = DataChoice(data, split, image_size, grayscale, classes, data_dir)
    model, meta, dev, test = _load_model(models, datas, device, n)
    names = tuple(test.classes)
    if target is not None and not 0 <= target < len(names):
        raise UsageError(f"--target must be a class index in [0, {len(names) - 1}], got {target}")
    train_x, train_y, test_x, test_y = _load_data(datas, meta, test, train_images, dev)
    footprint = _check_shape(shape, areas, test_x.shape[-2:])
    training = PatchTraining(steps=steps, batch_size=batch_size or 256, sink=sink, refine=refine)
    measure = dict(target=target, seed=seed, batch_size=batch_size, device=dev, draws=draws)
    rows = []
    stems = [_default_stem(out, test.name, a, target, len(areas) > 1) for a in areas]
    files = [stem.parent / f"{stem.name}{suffix}" for stem in stems for suffix in (".png", ".pt")]
    with output.progress(json_out) as bar, claim_outputs(*files):
        task = bar.add_task("training patches", total=len(areas))
        for a, stem in zip(areas, stems):
            gen = torch.Generator(device="cpu").manual_seed(seed)
            patch = train_patch(model, train_x, train_y, area=a, shape=footprint, target=target, generator=gen,
                               training=training)
            files = save_patch(patch, stem)
            rows.append(_row(a, patch, files, model, test_x, test_y, measure))
            bar.advance(task)
    if json_out:
        output.emit_json({"checkpoint": model_label(meta), "dataset": test.name, "targeted": target is not None,
                          "target": target, "train_images": int(train_x.shape[0]), "test_images": int(test_x.shape[0]),
                          "shape": footprint if isinstance(footprint, str) else list(footprint), "steps": steps,
                          "refine": refine, "sink": sink and target is None, "seed": seed, "draws": draws,
                          "results": rows})
        return
    output.stdout.print(_table(rows, target, int(test_x.shape[0]), names))
    for r in rows:
        output.stdout.print(f"saved {r['png']} and {r['tensor']}", soft_wrap=True)


def _check_counts(*, steps: int, train_images: int, n: int, draws: int, batch_size: Optional[int],
                  refine: int) -> None:
    for name, value in (("--steps", steps), ("--train-images", train_images), ("--n", n), ("--draws", draws),
                        ("--batch-size", batch_size)):
        positive(name, value)
    if refine < 0:
        raise UsageError(f"--refine must be >= 0, got {refine}")


def _row(area: float, patch: torch.Tensor, files: tuple[Path, Path], model, test_x, test_y,
         measure: dict[str, Any]) -> dict[str, Any]:
    """One trained patch's result: its files, and the patch and its noise control measured on the test images."""
    png, pt = files
    on_device = patch.to(measure["device"])
    return {"area_requested": area, "patch_shape": list(patch.shape), "png": str(png), "tensor": str(pt),
            "patch": measure_patch(model, test_x, test_y, on_device, **measure),
            "noise": measure_patch(model, test_x, test_y, on_device, noise=True, **measure)}


def _check_shape(shape: str, areas: list[float], image_size: tuple[int, int]):
    """The --shape option parsed, once every area was found to allow such a patch on images of ``image_size``."""
    footprint = parse_shape(shape)
    for a in areas:
        try:
            patch_footprints(footprint, a, *image_size)
        except ValueError as exc:
            raise UsageError(f"--area {a}: {exc}") from None
    return footprint


def _load_model(models: ModelChoice, datas: DataChoice, device: str, n: int):
    """The model on its device and the first ``n`` images it is measured on."""
    from robustcnn.device import resolve_device

    dev = resolve_device(device)
    keep_freed_memory()
    model, meta, test = load_sources(models, datas, dev, limit=n)
    return model, meta, dev, test


def _load_data(datas: DataChoice, meta: dict, test, train_images: int, dev: torch.device):
    """Training images (a split apart from the test images) and the test images, as floats on ``dev``."""
    from robustcnn.data import to_float

    train = datas.load(meta, split="train", limit=train_images, require_split=True)
    return (to_float(train.images, dev), train.labels.to(dev), to_float(test.images, dev), test.labels.to(dev))


def _table(rows: list[dict], target: Optional[int], count: int, classes: tuple[str, ...]) -> Table:
    goal = "untargeted" if target is None else f"target {target} ({classes[target]})"
    draws = len(rows[0]["patch"]["draws"])
    places = "at random locations" if draws == 1 else f"each at {draws} random locations (means; drop ± sd over them)"
    success = "success: correctly classified images " + ("fooled" if target is None else "sent to the target")
    t = Table(title=f"Universal patch, {goal}, on {count} held-out test images {places}",
              title_justify="left", caption_justify="left",
              caption="patched: accuracy on all the test images with the patch; drop: clean minus patched, in points; "
                      "robust: right both without and with it; " + success
                      + "; noise: the control, a uniform-noise patch of the same shape, fresh per image")
    for col in ("patch", "shape", "area", "clean", "patched", "drop (pts)", "robust", "success"):
        t.add_column(col, justify="left" if col == "patch" else "right")
    for r in rows:
        for kind in ("patch", "noise"):
            m = r[kind]
            t.add_row("trained" if kind == "patch" else "[dim]noise[/]", "x".join(map(str, r["patch_shape"][1:])),
                      f"{m['area']:.2%}", f"{m['clean_accuracy']:.2%}", f"{m['patched_accuracy']:.2%}",
                      _drop(m), f"{m['robust_accuracy']:.2%}", f"{m['success_rate']:.2%}")
        t.add_section()
    return t


def _drop(m: dict) -> str:
    drop = f"{100 * (m['clean_accuracy'] - m['patched_accuracy']):.2f}"
    return f"{drop} ± {100 * m['drop_sd']:.2f}" if len(m["draws"]) > 1 else drop
