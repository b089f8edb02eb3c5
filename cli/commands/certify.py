"""`robustcnn certify`: proven robustness of a checkpoint on its test set (randomized smoothing or IBP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli import output
from cli.distributed import refuse_distributed
from cli.options import BatchSize, Checkpoint, DataDir, Device, Json, Seed, parse_eps_list, positive
from robustcnn.errors import RobustCNNError, UsageError, check_choice

METHODS = ("smoothing", "ibp")
#: The one norm each method certifies.
METHOD_NORM = {"smoothing": "l2", "ibp": "linf"}
DEFAULT_RADII = "0,0.25,0.5,0.75,1,1.25,1.5"
SMOOTHING = "Randomized smoothing"
IBP = "Interval bound propagation"


class SoundnessError(RobustCNNError):
    """A sample verified by IBP was misclassified or fooled by the attack (exit 1, after the results are shown)."""


def certify_cmd(
    method: Annotated[str, typer.Option("--method", help="smoothing (L2 radius of the Gaussian-smoothed classifier, "
                                        "Cohen et al.) or ibp (Linf verification of the model itself, Gowal et al.).")]
    = "smoothing",
    n: Annotated[int, typer.Option("--n", "-n", help="Number of test images (the first N).")] = 500,
    sigma: Annotated[Optional[float], typer.Option("--sigma", help="Noise level of the smoothed classifier (pixel "
                                                   "units). Default: the checkpoint's --noise sigma.",
                                                   rich_help_panel=SMOOTHING, show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", help="Noise samples per image to estimate the top class's "
                                         "probability.", rich_help_panel=SMOOTHING)] = 10_000,
    n0: Annotated[int, typer.Option("--n0", help="Noise samples per image to choose the top class.",
                                    rich_help_panel=SMOOTHING)] = 100,
    alpha: Annotated[float, typer.Option("--alpha", help="Failure probability of each certificate.",
                                         rich_help_panel=SMOOTHING)] = 0.001,
    radii: Annotated[str, typer.Option("--radii", help="L2 radii of the certified-accuracy table and plot.",
                                       rich_help_panel=SMOOTHING)] = DEFAULT_RADII,
    eps: Annotated[Optional[str], typer.Option("--eps", help="Linf budgets, e.g. 0.05,0.1 or 8/255. Default: the "
                                               "dataset's usual one (Fashion-MNIST 0.1).", rich_help_panel=IBP,
                                               show_default=False)] = None,
    attack: Annotated[bool, typer.Option("--attack/--no-attack", help="Also attack every image (PGD-20) for the "
                                         "attacked accuracy beside the verified one; a verified image that is "
                                         "fooled is a soundness error (exit 1).", rich_help_panel=IBP)] = True,
    norm: Annotated[Optional[str], typer.Option("--norm", help="Threat model: l2 (smoothing) or linf (ibp); each "
                                                "method certifies only its own.", show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write certified accuracy against radius (or eps) "
                                                 "as a PNG.")] = None,
    per_sample: Annotated[bool, typer.Option("--per-sample", help="With --json: every image's prediction, radius "
                                             "or verified flags.")] = False,
    checkpoint: Checkpoint = None,
    data_dir: DataDir = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: Json = False,
) -> None:
    """Certified robust accuracy: a proven lower bound to set beside the attacked upper bound.

    smoothing: per image the smoothed prediction (or abstention) and its certified L2 radius, which holds with
    probability 1 - alpha; train for it with `robustcnn train --noise gaussian --sigma S`. ibp: per image and eps
    whether no Linf perturbation can change the prediction; train for it with `robustcnn train --adv ibp`.
    """
    refuse_distributed("certify")
    method = check_choice("certification method", method, METHODS)
    if norm is not None and check_choice("norm", norm, ("linf", "l2")) != METHOD_NORM[method]:
        raise UsageError(f"--method {method} certifies {METHOD_NORM[method]} only, not {norm}")
    positive("--n", n)
    positive("--batch-size", batch_size)
    if sigma is not None and not 0 < sigma < float("inf"):
        raise UsageError(f"--sigma must be > 0, got {sigma}")
    for flag, value in (("--samples", samples), ("--n0", n0)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if not 0 < alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {alpha}")
    radius_grid = parse_radii(radii)
    eps_list = parse_eps_list(eps) if eps is not None else None
    if method == "smoothing" and eps is not None:
        raise UsageError("--eps applies to --method ibp; smoothing certifies L2 radii (see --radii)")
    if method == "ibp" and sigma is not None:
        raise UsageError("--sigma applies to --method smoothing")
    if plot is not None:
        from robustcnn.plots import check_png_path

        check_png_path(plot, "--plot")

    from robustcnn.checkpoint import latest_checkpoint, load_model
    from robustcnn.data import load_dataset
    from robustcnn.device import resolve_device
    from robustcnn.report import usual_eps

    dev = resolve_device(device)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint()
    model, meta = load_model(path, dev)
    if method == "smoothing":
        sigma = sigma if sigma is not None else meta.get("config", {}).get("noise_sigma")
        if sigma is None:
            raise UsageError(f"{path} was not trained with --noise gaussian: give --sigma")
    else:
        from robustcnn.certify import check_supported

        try:
            check_supported(model)
        except ValueError as exc:
            raise RobustCNNError(f"{path}: {exc}") from None
        eps_list = eps_list or parse_eps_list(usual_eps(meta["dataset"], "linf"))
    data = load_dataset(meta["dataset"], train=False, data_dir=data_dir)
    if list(data.shape) != list(meta["input_shape"]) or list(data.classes) != list(meta["classes"]):
        raise RobustCNNError(f"{path} was trained on {meta['input_shape']} images of {len(meta['classes'])} classes, "
                             f"but {meta['dataset']} here has {list(data.shape)} and {len(data.classes)}")
    count = min(n, len(data))
    images, labels = data.images[:count], data.labels[:count]
    doc = {"checkpoint": str(path), "model": meta["architecture"], "dataset": meta["dataset"], "method": method,
           "norm": METHOD_NORM[method], "n": count}
    if method == "smoothing":
        _smoothing(doc, model, images, labels, len(data.classes), sigma, n0, samples, alpha, radius_grid,
                   batch_size or 1000, seed, json_out, per_sample, plot)
    else:
        _ibp(doc, model, images, labels, eps_list, attack, batch_size or 250, seed, json_out, per_sample, plot)


def parse_radii(text: str) -> list[float]:
    """``0,0.25,0.5`` as a sorted list of radii >= 0."""
    try:
        values = sorted(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UsageError(f"invalid --radii {text!r}: write radii >= 0 separated by commas, e.g. 0,0.25,0.5") from None
    if not values or values[0] < 0 or values[-1] == float("inf") or any(v != v for v in values):
        raise UsageError(f"invalid --radii {text!r}: write radii >= 0 separated by commas, e.g. 0,0.25,0.5")
    return values


def _smoothing(doc, model, images, labels, num_classes, sigma, n0, samples, alpha, radii, batch_size, seed,
               json_out, per_sample, plot) -> None:
    import time

    from robustcnn.certify import certified_accuracy, smooth_certify

    start = time.perf_counter()
    with output.progress(json_out) as bar:
        task = bar.add_task("certifying", total=len(labels))
        rows = smooth_certify(model, images, labels, sigma=sigma, num_classes=num_classes, n0=n0, samples=samples,
                              alpha=alpha, batch_size=batch_size, seed=seed,
                              on_image=lambda done: bar.update(task, completed=done))
    accuracy = certified_accuracy(rows, radii)
    doc.update(sigma=sigma, n0=n0, samples=samples, alpha=alpha, seconds=time.perf_counter() - start,
               abstained=sum(r["prediction"] is None for r in rows) / max(1, len(rows)),
               clean_accuracy=sum(r["correct"] for r in rows) / max(1, len(rows)),
               certified_accuracy=[{"radius": r, "accuracy": a} for r, a in zip(radii, accuracy)])
    if per_sample:
        doc["per_sample"] = rows
    if plot is not None:
        from robustcnn.plots import save_curves

        save_curves(plot, radii, {f"smoothing, sigma {sigma:g}": accuracy},
                    f"{doc['model']} on {doc['dataset']}: certified accuracy ({doc['n']} images)", "L2 radius")
    if json_out:
        output.emit_json(doc)
        return
    table = Table(title=f"randomized smoothing, sigma {sigma:g}, {samples:,} samples, alpha {alpha:g}: "
                        f"{doc['n']} images of {doc['dataset']}", title_justify="left")
    table.add_column("L2 radius", justify="right")
    table.add_column("certified accuracy", justify="right")
    for r, a in zip(radii, accuracy):
        table.add_row(f"{r:g}", f"{a:.1%}")
    output.stdout.print(table)
    output.stdout.print(f"smoothed accuracy (radius 0, abstentions wrong) {doc['clean_accuracy']:.1%}, abstained "
                        f"{doc['abstained']:.1%}, {doc['seconds']:.1f}s", highlight=False)
    if plot is not None:
        output.stdout.print(f"plot written to {plot}", highlight=False)


def _ibp(doc, model, images, labels, eps_list, attack, batch_size, seed, json_out, per_sample, plot) -> None:
    import attacks
    from robustcnn.certify import ibp_certify

    make_attack = (lambda e: attacks.PGD(eps=e, norm="linf", steps=20)) if attack else None
    result = ibp_certify(model, images, labels, eps_list, batch_size=batch_size, attack=make_attack, seed=seed)
    rows = result.summary()
    doc.update(attack="PGD-20" if attack else None, results=rows)
    if per_sample:
        doc["per_sample"] = result.per_sample(labels)
    if plot is not None:
        from robustcnn.plots import save_curves

        curves = {"IBP-verified": [r["verified_accuracy"] for r in rows]}
        if attack:
            curves["PGD-20 (attacked)"] = [r["attacked_accuracy"] for r in rows]
        save_curves(plot, eps_list, curves, f"{doc['model']} on {doc['dataset']}: verified and attacked accuracy "
                    f"({doc['n']} images)", "Linf eps")
    errors = [(r["eps"], i) for r in rows for i in r["soundness_errors"]]
    if json_out:
        output.emit_json(doc)
    else:
        table = Table(title=f"interval bound propagation: {doc['n']} images of {doc['dataset']}", title_justify="left")
        for col in ("Linf eps", "clean", "verified (proven)", "attacked (PGD-20)", "soundness errors"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(f"{r['eps']:g}", f"{r['clean_accuracy']:.1%}", f"{r['verified_accuracy']:.1%}",
                          "-" if r["attacked_accuracy"] is None else f"{r['attacked_accuracy']:.1%}",
                          str(len(r["soundness_errors"])))
        output.stdout.print(table)
        if plot is not None:
            output.stdout.print(f"plot written to {plot}", highlight=False)
    if errors:
        eps, index = errors[0]
        raise SoundnessError(f"soundness error: {len(errors)} verified image(s) misclassified or fooled (first: "
                             f"image {index} at eps {eps:g}); the bounds or the model's layers are wrong")
