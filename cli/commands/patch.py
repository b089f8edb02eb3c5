"""`robustcnn patch train`: train universal adversarial patches, save them, and measure them on held-out images.

Also home of :func:`load_patch` / :func:`save_patch`, the patch file formats the CLI reads and writes: a PNG (for
eyes and image tools; 8 bits per channel) and a tensor file ``.pt`` (the exact float patch).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer
from rich.table import Table

import attacks
from attacks.patch import SHAPES, PatchTraining, check_patch, patch_footprints, train_patch
from cli import output
from cli.app import app
from cli.distributed import refuse_distributed
from cli.options import BatchSize, Checkpoint, DataDir, Device, Json, Seed, positive
from cli.sources import (Classes, DataChoice, DataSpec, Grayscale, ImageSize, LogitsFromProbs, Mean, ModelChoice,
                         ModelSpec, OutputIndex, Split, Std, Weights, load_sources, model_label)
from robustcnn.errors import RobustCNNError, UsageError
from robustcnn.perf import keep_freed_memory

TENSOR_SUFFIXES = (".pt", ".pth")
PATCH = "Patch options"

patch_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Universal adversarial patches (Brown et al. 2017): train, save, measure on held-out images.",
)
app.add_typer(patch_app, name="patch")


# -- patch files ---------------------------------------------------------------------------------------------------
def load_patch(path: str | Path, image_shape: Optional[tuple[int, int, int]] = None) -> torch.Tensor:
    """Read a patch saved as a tensor file (``.pt``/``.pth``) or an image (PNG, JPEG); returns ``(C, h, w)`` floats.

    With ``image_shape = (C, H, W)`` the patch must also fit the model's images (same channels, smaller than the
    image). A file that cannot be read raises :class:`RobustCNNError` (exit 1); one that is not a patch (not an image,
    wrong shape or values) raises :class:`UsageError` (exit 2).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RobustCNNError(f"cannot read patch file {path}: {exc.strerror or exc}") from None
    patch = _tensor_from_bytes(raw, path) if path.suffix.lower() in TENSOR_SUFFIXES else _image_from_bytes(raw, path)
    try:
        return check_patch(patch, image_shape)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _tensor_from_bytes(raw: bytes, path: Path) -> torch.Tensor:
    try:
        patch = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception:  # torch.load fails in many ways on foreign bytes; all mean "not a tensor file"
        raise UsageError(f"{path} is not a tensor file (save a patch with `robustcnn patch train`)") from None
    if not isinstance(patch, torch.Tensor):
        raise UsageError(f"{path} holds a {type(patch).__name__}, not a patch tensor of shape (C, h, w)")
    return patch.float()


def _image_from_bytes(raw: bytes, path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            mode, pixels = img.mode, np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError):
        raise UsageError(f"{path} is not an image or tensor file (use a PNG, or the .pt a patch run wrote)") from None
    if mode not in ("L", "RGB"):
        raise UsageError(f"{path}: a patch image must be 8-bit grayscale or RGB without alpha, got mode {mode}")
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(chw.copy()).float() / 255


def save_patch(patch: torch.Tensor, stem: Path) -> tuple[Path, Path]:
    """Write ``patch`` as ``<stem>.png`` and ``<stem>.pt``, each atomically; returns both paths."""
    from PIL import Image

    from robustcnn.fsutil import atomic_write

    patch = check_patch(patch.detach().cpu().float())
    pixels = (patch * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buf = io.BytesIO()
    torch.save(patch.clone(), buf)
    png_path = atomic_write(stem.parent / f"{stem.name}.png", lambda handle: img.save(handle, format="PNG"))
    pt_path = atomic_write(stem.parent / f"{stem.name}.pt", lambda handle: handle.write(buf.getvalue()))
    return png_path, pt_path


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


def _measure(model, images, labels, patch, *, target, seed, batch_size, device, noise=False,
             draws: int = 1) -> dict[str, Any]:
    """How ``patch`` at random places does on the test images; with ``noise`` the same for the control, a
    uniform-noise patch of the same size drawn afresh for every image.

    ``patched_accuracy`` is the model's accuracy on every test image with the patch pasted on it (what "accuracy
    under the patch" means for a patch applied to every image); ``robust_accuracy`` counts an image only if it was
    classified correctly both without and with the patch (the attack convention, which never credits a patch for
    an image it happened to put right); ``success_rate`` is the share of the correctly classified images fooled
    (targeted: sent to the target). Every image gets the same place in both measures.

    With ``draws`` > 1 every image is patched at ``draws`` places (draw ``d`` uses the per-sample keys of seed
    ``seed + d``, so draw 0 is the single-draw measure); the three figures are means over the draws, each draw's
    are listed under ``"draws"``, and ``drop_sd`` is the standard deviation over the draws of the accuracy drop
    (clean minus patched accuracy): how much of a figure is the luck of where the patches landed.
    """
    from attacks.evaluate import correctly_classified, run_stage

    atk = attacks.UniversalPatch(patch=patch, noise=noise)
    n, bs = images.shape[0], batch_size or 256
    model.eval()
    clean = correctly_classified(model, images, labels, batch_size=bs, device=device)
    per_draw = []
    for d in range(draws):
        run = dict(batch_size=bs, device=device, seed=seed + d)  # evaluate's per-sample keys: same places
        wrong = run_stage(model, images, labels, torch.arange(n), atk, "patch", **run).fooled  # every image, patched
        if target is None:
            hit = wrong[clean]
        else:
            tgt = torch.full_like(labels, target)
            hit = run_stage(model, images, labels, clean.nonzero()[:, 0], atk, "patch", target=tgt, **run).fooled
        per_draw.append({"patched_accuracy": (n - int(wrong.sum())) / n,
                         "robust_accuracy": (int(clean.sum()) - int(hit.sum())) / n,
                         "success_rate": hit.float().mean().item()})
    mean = {k: sum(r[k] for r in per_draw) / draws for k in per_draw[0]}
    patched = torch.tensor([r["patched_accuracy"] for r in per_draw], dtype=torch.float64)
    return {"clean_accuracy": int(clean.sum()) / n, **mean,
            "drop_sd": patched.std().item() if draws > 1 else 0.0, "draws": per_draw,
            "area": patch.shape[1] * patch.shape[2] / images[0, 0].numel()}


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
    for name, value in (("--steps", steps), ("--train-images", train_images), ("--n", n), ("--draws", draws),
                        ("--batch-size", batch_size)):
        positive(name, value)
    if refine < 0:
        raise UsageError(f"--refine must be >= 0, got {refine}")
    from robustcnn.data import to_float
    from robustcnn.device import resolve_device

    dev = resolve_device(device)
    keep_freed_memory()
    models = ModelChoice(model_spec, checkpoint, weights, mean, std, output_index, logits_from_probs)
    datas = DataChoice(data, split, image_size, grayscale, classes, data_dir)
    model, meta, test = load_sources(models, datas, dev, limit=n)
    names = tuple(test.classes)
    if target is not None and not 0 <= target < len(names):
        raise UsageError(f"--target must be a class index in [0, {len(names) - 1}], got {target}")
    train = datas.load(meta, split="train", limit=train_images, require_split=True)
    train_x, train_y = to_float(train.images, dev), train.labels.to(dev)
    test_x, test_y = to_float(test.images, dev), test.labels.to(dev)
    footprint = parse_shape(shape)
    for a in areas:
        try:
            patch_footprints(footprint, a, test_x.shape[-2], test_x.shape[-1])
        except ValueError as exc:
            raise UsageError(f"--area {a}: {exc}") from None
    measure = dict(target=target, seed=seed, batch_size=batch_size, device=dev, draws=draws)
    rows = []
    with output.progress(json_out) as bar:
        task = bar.add_task("training patches", total=len(areas))
        for a in areas:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            patch = train_patch(model, train_x, train_y, area=a, shape=footprint, target=target, generator=gen,
                                training=PatchTraining(steps=steps, batch_size=batch_size or 256, sink=sink,
                                                       refine=refine))
            png, pt = save_patch(patch, _default_stem(out, test.name, a, target, len(areas) > 1))
            rows.append({"area_requested": a, "patch_shape": list(patch.shape), "png": str(png), "tensor": str(pt),
                         "patch": _measure(model, test_x, test_y, patch.to(dev), **measure),
                         "noise": _measure(model, test_x, test_y, patch.to(dev), noise=True, **measure)})
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
