"""`robustcnn attack` (one attack, one or several budgets) and `robustcnn attacks` (the registry)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.table import Table

import attacks
from cli import output
from cli.distributed import session
from cli.options import BatchSize, Checkpoint, DataDir, Device, Json, Seed, parse_eps, parse_eps_list, positive
from cli.sources import (Classes, DataChoice, DataSpec, Grayscale, ImageSize, LogitsFromProbs, Mean, ModelChoice,
                         ModelSpec, OutputIndex, Split, Std, Weights, load_sources, model_label)
from robustcnn.errors import UsageError
from robustcnn.plots import check_png_path, save_grid

ATTACK = "Attack options (each applies only to the methods that have it)"

#: CLI option -> attack dataclass field. An option the user sets must exist on the chosen attack.
OPTION_FIELDS = {
    "norm": "norm", "steps": "steps", "alpha": "alpha", "restarts": "restarts", "loss": "loss", "c": "c",
    "queries": "max_queries", "pixels": "pixels", "area": "area", "basis": "basis",
}

#: Attack kinds that spend queries rather than gradients: their table shows queries per successful image.
QUERY_KINDS = ("score", "decision")


def build_attack(method: str, eps: Optional[float], options: dict[str, Any]) -> attacks.Attack:
    """Build ``method`` from CLI options, refusing options the method does not have (usage errors)."""
    try:
        spec = attacks.get(method)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    params = spec.params
    kwargs: dict[str, Any] = {}
    if eps is not None:
        if "eps" not in params:
            raise UsageError(f"--eps does not apply to {spec.name}")
        kwargs["eps"] = eps
    for opt, value in options.items():
        if value is None:
            continue
        fld = OPTION_FIELDS[opt]
        if fld not in params:
            takes = ", ".join(f"--{o}" for o, f in OPTION_FIELDS.items() if f in params) or "none of them"
            raise UsageError(f"--{opt} does not apply to {spec.name} (it takes {takes})")
        kwargs[fld] = value
    if "norm" in kwargs and kwargs["norm"] not in spec.norms:
        raise UsageError(f"{spec.name} does not support --norm {kwargs['norm']}: it supports {', '.join(spec.norms)}")
    try:
        return spec.build(**kwargs)
    except ValueError as exc:
        raise UsageError(f"{spec.name}: {exc}") from None


def _targets(y: torch.Tensor, classes: int, targeted: bool, target_class: Optional[int], seed: int):
    if target_class is not None:
        if not 0 <= target_class < classes:
            raise UsageError(f"--target-class must be in [0, {classes - 1}], got {target_class}")
        return torch.full_like(y, target_class)
    if not targeted:
        return None
    g = torch.Generator().manual_seed(seed)
    return (y + 1 + torch.randint(classes - 1, y.shape, generator=g)) % classes  # a random wrong class each


def _with_patch(atk, patch_file, model, meta, datas: DataChoice, shape, dev, target_class, seed):
    """The universal patch attack with a loaded patch, or one trained on training images (never the test images)."""
    from attacks.patch import DEFAULT_AREA, train_patch
    from robustcnn.patches import load_patch

    if patch_file is not None:
        tensor = load_patch(patch_file, tuple(shape))
    else:
        train = datas.load(meta, split="train", limit=2000, require_split=True)
        tensor = train_patch(model, train.images[:2000].float().div(255).to(dev), train.labels[:2000].to(dev),
                             area=atk.area or DEFAULT_AREA, target=target_class,
                             generator=torch.Generator().manual_seed(seed))
    try:
        return dataclasses.replace(atk, patch=tensor.to(dev))
    except ValueError as exc:
        raise UsageError(f"patch: {exc}") from None


def _fmt(v: float, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def _table(method: str, rows: list[dict], targeted: bool, kind: str = "white-box") -> Table:
    """One row per budget. Black-box methods show their query budget and the queries per *successful* image (mean
    and median: the usual black-box figure) instead of backward passes, which they never make."""
    queries = kind in QUERY_KINDS
    t = Table(title=f"{method} on {rows[0]['n']} test images — accuracy clean and under attack"
                    + (" (targeted: 'robust' = target not reached)" if targeted else ""), title_justify="left",
              caption="q mean, q median: queries per successful image" if queries else
              "noise: the control, a uniform-noise patch of the same size (a fresh one per image)"
              if kind == "patch" else None, caption_justify="left")
    patch = kind == "patch"
    cols = ["patch" if patch else "eps", "clean", "robust", "success", "mean norm", "max norm", "fwd/img"]
    cols += ["budget", "q mean", "q median"] if queries else ["bwd/img"]
    for col in cols + ["time"]:
        t.add_column(col, justify="right", min_width=7 if col == "patch" else min(len(col), 7))
    for r in rows:
        a = r["attacks"][method] if method in r["attacks"] else next(iter(r["attacks"].values()))
        first = ("[dim]noise[/]" if r.get("control") else "trained") if patch else _fmt(r["eps"], 3)
        cells = [first, f"{r['clean_accuracy']:.1%}", f"{r['robust_accuracy']:.1%}",
                 f"{a['success_rate']:.1%}" if a["seen"] else "-", _fmt(a["mean_norm"], 3), _fmt(a["max_norm"], 3),
                 _fmt(a["queries_mean"], 3)]
        if queries:
            budget = a["config"].get("max_queries")
            cells += [str(budget) if budget is not None else "-", _fmt(a["queries_mean_success"], 4),
                      _fmt(a["queries_median_success"], 4)]
        else:
            cells.append(_fmt(a["gradients_mean"], 3))
        t.add_row(*cells, f"{r['seconds']:.1f}s")
    return t


def attack_cmd(
    method: Annotated[str, typer.Option("--method", "-m", help="Attack to run: "
                                        + ", ".join(attacks.available()) + ". See `robustcnn attacks`.")] = "pgd",
    eps: Annotated[Optional[str], typer.Option(
        help="Budget in [0,1] pixel units: 0.005, 8/255, or a list 0.01,0.02,0.05 for a sweep. Default: the "
             "attack's own (8/255 Linf, 0.5 L2; none for minimum-norm attacks).")] = None,
    norm: Annotated[Optional[str], typer.Option(help="Threat model: linf or l2 (and l0 for sparse attacks).",
                                                rich_help_panel=ATTACK)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Iterations.", rich_help_panel=ATTACK)] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Step size in pixel units (0.01 or 2/255).",
                                                 rich_help_panel=ATTACK)] = None,
    restarts: Annotated[Optional[int], typer.Option(help="Random restarts.", rich_help_panel=ATTACK)] = None,
    loss: Annotated[Optional[str], typer.Option(help="Loss to maximize: ce, dlr or margin.",
                                                rich_help_panel=ATTACK)] = None,
    c: Annotated[Optional[float], typer.Option("--c", help="Carlini-Wagner: initial trade-off constant.",
                                               rich_help_panel=ATTACK)] = None,
    queries: Annotated[Optional[int], typer.Option(help="Query budget per image (black-box attacks).",
                                                   rich_help_panel=ATTACK)] = None,
    pixels: Annotated[Optional[int], typer.Option(help="Pixels the attack may change (pixel attacks).",
                                                  rich_help_panel=ATTACK)] = None,
    area: Annotated[Optional[float], typer.Option(help="Patch area as a fraction of the image (patch attacks).",
                                                  rich_help_panel=ATTACK)] = None,
    basis: Annotated[Optional[str], typer.Option(help="SimBA: search directions, pixel (single pixels) or dct "
                                                 "(low-frequency cosine images first).",
                                                 rich_help_panel=ATTACK)] = None,
    patch: Annotated[Optional[Path], typer.Option(
        help="--method patch: a saved patch (.pt or .png from `robustcnn patch train`). Without it a patch of "
             "--area is first trained on 2,000 training images (its rectangle picked by trials, as `robustcnn patch "
             "train --shape auto` does), then evaluated on the test images.",
        rich_help_panel=ATTACK)] = None,
    targeted: Annotated[bool, typer.Option("--targeted", help="Targeted mode: aim each image at a random wrong "
                                           "class (seeded).", rich_help_panel=ATTACK)] = False,
    target_class: Annotated[Optional[int], typer.Option(help="Targeted mode: aim every image at this class index.",
                                                        rich_help_panel=ATTACK)] = None,
    n: Annotated[Optional[int], typer.Option("--n", "-n", help="Attack only the first N test images (default: all). Under torchrun write -n: torchrun reads --n as one of its own options.")] = None,
    save_examples: Annotated[Optional[Path], typer.Option(
        help="Write a PNG grid of originals, adversarial images and amplified perturbations.")] = None,
    per_sample: Annotated[bool, typer.Option("--per-sample", help="With --json: include per-image results "
                                             "(fooled, norm, queries).")] = False,
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
    """Attack a trained model on its test set and report accuracy under attack.

    With no options it runs PGD on the newest model from `robustcnn train`. Budgets are in [0, 1] pixel units.
    """
    eps_list = parse_eps_list(eps) if eps is not None else [None]
    positive("--n", n)
    positive("--batch-size", batch_size)
    options = {"norm": norm, "steps": steps, "alpha": parse_eps(alpha) if alpha is not None else None,
               "restarts": restarts, "loss": loss, "c": c, "queries": queries, "pixels": pixels, "area": area,
               "basis": basis}
    built = [build_attack(method, e, options) for e in eps_list]  # every usage error before any work
    if save_examples is not None:
        check_png_path(save_examples, "--save-examples")
    spec = attacks.get(method)
    if (targeted or target_class is not None) and not spec.targeted:
        raise UsageError(f"{spec.name} has no targeted mode")
    if patch is not None and spec.name != "patch":
        raise UsageError(f"--patch applies to --method patch only, not {spec.name}")

    with session(device) as (ctx, dev):
        models = ModelChoice(model_spec, checkpoint, weights, mean, std, output_index, logits_from_probs)
        datas = DataChoice(data, split, image_size, grayscale, classes, data_dir)
        model, meta, test = load_sources(models, datas, dev, limit=n, main_first=ctx.main_first)
        images, labels, names = test.images, test.labels, tuple(test.classes)
        target = _targets(labels, len(names), targeted, target_class, seed)
        if spec.name == "patch":
            built = [_with_patch(atk, patch, model, meta, datas, test.shape, dev, target_class, seed)
                     for atk in built]
        rows, last = [], None
        with output.progress(json_out or not ctx.is_main) as bar:
            for e, atk in zip(eps_list, built):
                task = bar.add_task(f"{spec.name} eps={_fmt(atk.eps) if hasattr(atk, 'eps') else '-'}", total=None)
                report = attacks.evaluate(
                    model, (images, labels), [atk], batch_size=batch_size, device=dev, seed=seed, target=target,
                    keep_examples=save_examples is not None and last is None,
                    progress=lambda _name, done, total, task=task: bar.update(task, completed=done, total=total),
                    shard=ctx.shard,
                )
                last = last or report
                rows.append({"eps": getattr(atk, "eps", None), **report.to_dict(per_sample=per_sample)})
                if spec.name == "patch":  # the control: a same-size uniform-noise patch, a fresh one per image
                    control = attacks.evaluate(model, (images, labels), [dataclasses.replace(atk, noise=True)],
                                               batch_size=batch_size, device=dev, seed=seed, target=target,
                                               shard=ctx.shard)
                    rows.append({"eps": None, "control": "noise", **control.to_dict(per_sample=per_sample)})
        if not ctx.is_main:  # rank 0 writes and prints; the others are done
            return

        if save_examples is not None:
            fooled = (~last.robust & last.clean_correct).nonzero().squeeze(1)
            save_grid(save_examples, images[fooled].float() / 255, last.x_adv[fooled], labels[fooled], model, names, dev)
        if json_out:
            output.emit_json({"checkpoint": model_label(meta), "dataset": test.name, "method": spec.name,
                              "targeted": target is not None, "results": rows})
            return
        output.stdout.print(_table(spec.name, rows, target is not None, spec.kind))
        for w in rows[0]["warnings"]:
            output.stderr.print(f"[yellow]warning:[/] {w}")
        if save_examples is not None:
            output.stdout.print(f"examples written to {save_examples}")


def attacks_cmd(
    kind: Annotated[Optional[str], typer.Option(help="Only this kind: " + ", ".join(attacks.KINDS) + ".")] = None,
    json_out: Json = False,
) -> None:
    """List the registered attacks with their kind, norms, targeted mode and a one-line description."""
    try:
        names = attacks.available(kind)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    specs = [attacks.get(nm) for nm in names]
    if json_out:
        output.emit_json([{"name": s.name, "kind": s.kind, "norms": list(s.norms), "targeted": s.targeted,
                           "description": s.description, "params": s.params} for s in specs])
        return
    t = Table(title="Registered attacks", title_justify="left")
    for col in ("name", "kind", "norms", "targeted", "description"):
        t.add_column(col)
    for s in specs:
        t.add_row(s.name, s.kind, ", ".join(s.norms), "yes" if s.targeted else "no", s.description)
    output.stdout.print(t)
