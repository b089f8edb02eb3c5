"""`robustcnn attack` (one attack, one or several budgets) and `robustcnn attacks` (the registry)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

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

ATTACK = "Attack options (each applies only to the methods that have it; `robustcnn attacks METHOD` lists them)"

#: The named attack options: shortcuts for ``--param FIELD=VALUE`` (option -> attack dataclass field). An option the
#: user sets must exist on the chosen attack.
SHORTCUTS = {
    "norm": "norm", "steps": "steps", "alpha": "alpha", "restarts": "restarts", "loss": "loss", "c": "c",
    "queries": "max_queries", "pixels": "pixels", "area": "area", "basis": "basis",
}
#: Fields set by options of their own rather than ``--param``.
OWN_OPTION = {"eps": "--eps (a budget or a list of budgets)", "patch": "--patch FILE"}

#: Attack kinds that spend queries rather than gradients: their table shows queries per successful image.
QUERY_KINDS = ("score", "decision")


def _spec(method: str) -> attacks.AttackSpec:
    try:
        return attacks.get(method)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_params(spec: attacks.AttackSpec, texts: Sequence[str]) -> dict[str, Any]:
    """``--param NAME=VALUE`` settings of ``spec``'s attack, each value read by its field's type (usage errors)."""
    out: dict[str, Any] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--param takes NAME=VALUE, got {text!r}")
        try:
            field = spec.parameter(name)
        except ValueError as exc:
            raise UsageError(f"--param {name}: {exc}") from None
        if name in OWN_OPTION:
            raise UsageError(f"--param {name}: set {name} with {OWN_OPTION[name]}")
        if name in out:
            raise UsageError(f"--param {name} is given twice")
        try:
            out[name] = field.parse(value)
        except ValueError as exc:
            raise UsageError(f"--param {name}: {exc}") from None
    return out


def build_attack(method: str, eps: Optional[float], options: dict[str, Any],
                 params: Sequence[str] = ()) -> attacks.Attack:
    """Build ``method`` from CLI options: ``eps``, the named ``options`` (:data:`SHORTCUTS`, None = not given) and
    ``params`` (``NAME=VALUE`` texts), refusing settings the method does not have or accept (usage errors)."""
    spec = _spec(method)
    known = spec.params
    kwargs: dict[str, Any] = {}
    if eps is not None:
        if "eps" not in known:
            raise UsageError(f"--eps does not apply to {spec.name}")
        kwargs["eps"] = eps
    for opt, value in options.items():
        if value is None:
            continue
        fld = SHORTCUTS[opt]
        if fld not in known:
            takes = ", ".join(f"--{o}" for o, f in SHORTCUTS.items() if f in known) or "none of them"
            raise UsageError(f"--{opt} does not apply to {spec.name} (it takes {takes}, and --param NAME=VALUE)")
        kwargs[fld] = value
    for name, value in parse_params(spec, params).items():
        if name in kwargs:
            opt = next(o for o, f in SHORTCUTS.items() if f == name)
            raise UsageError(f"{name} is set twice: by --{opt} and by --param {name}")
        kwargs[name] = value
    if options.get("norm") is not None and options["norm"] not in spec.norms:
        raise UsageError(f"{spec.name} does not support --norm {options['norm']}: it supports {', '.join(spec.norms)}")
    try:
        return spec.build(**kwargs)
    except ValueError as exc:
        raise UsageError(f"{spec.name}: {exc}") from None


def _default_norm(method: str) -> str:
    """The norm ``--eps`` is measured in when ``--norm`` is not given: the attack's own (linf if it has none)."""
    try:
        return attacks.get(method).params.get("norm") or "linf"
    except ValueError:  # an unknown attack is reported by build_attack
        return "linf"


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
        help="Budget in pixel units of [0, 1] images (Linf at most 1, L2 at most the image's diameter): 0.005, "
             "8/255, or a list 0.01,0.02,0.05 for a sweep. Default: the "
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
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", metavar="NAME=VALUE",
        help="Set any parameter of the method, read by its type (8/255 for pixel units, true/false, none); "
             "repeatable: --param decay=0.5 --param eot_samples=4. `robustcnn attacks METHOD` lists them with "
             "defaults and help. The options above are shortcuts for the common ones.",
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
    eps_norm = norm or _default_norm(method)
    eps_list = parse_eps_list(eps, eps_norm) if eps is not None else [None]
    positive("--n", n)
    positive("--batch-size", batch_size)
    shortcuts = {"norm": norm, "steps": steps, "alpha": parse_eps(alpha, eps_norm) if alpha is not None else None,
                 "restarts": restarts, "loss": loss, "c": c, "queries": queries, "pixels": pixels, "area": area,
                 "basis": basis}
    spec, built = _plan(method, eps_list, shortcuts, param or [], targeted=targeted, target_class=target_class,
                        patch=patch, save_examples=save_examples)
    with session(device) as (ctx, dev):
        models = ModelChoice(model_spec, checkpoint, weights, mean, std, output_index, logits_from_probs)
        datas = DataChoice(data, split, image_size, grayscale, classes, data_dir)
        model, meta, test = load_sources(models, datas, dev, limit=n, main_first=ctx.main_first)
        images, labels, names = test.images, test.labels, tuple(test.classes)
        target = _targets(labels, len(names), targeted, target_class, seed)
        if spec.name == "patch":
            built = [_with_patch(atk, patch, model, meta, datas, test.shape, dev, target_class, seed)
                     for atk in built]
        rows, first = _evaluate_each(spec, built, model, images, labels, target, ctx=ctx, dev=dev,
                                     batch_size=batch_size, seed=seed, keep_examples=save_examples is not None,
                                     per_sample=per_sample, quiet=json_out or not ctx.is_main)
        if not ctx.is_main:  # rank 0 writes and prints; the others are done
            return
        if save_examples is not None:
            fooled = (~first.robust & first.clean_correct).nonzero().squeeze(1)
            save_grid(save_examples, images[fooled].float() / 255, first.x_adv[fooled], labels[fooled], model,
                      names, dev)
        _render(spec, rows, targeted=target is not None, json_out=json_out, save_examples=save_examples,
                header={"checkpoint": model_label(meta), "dataset": test.name})


def _plan(method: str, eps_list: list[Optional[float]], shortcuts: dict[str, Any], params: Sequence[str], *,
          targeted: bool, target_class: Optional[int], patch: Optional[Path], save_examples: Optional[Path]):
    """Every usage check before any work: ``(spec, one built attack per budget of eps_list)``."""
    built = [build_attack(method, e, shortcuts, params) for e in eps_list]
    if save_examples is not None:
        check_png_path(save_examples, "--save-examples")
    spec = _spec(method)
    if (targeted or target_class is not None) and not spec.targeted:
        raise UsageError(f"{spec.name} has no targeted mode")
    if patch is not None and spec.name != "patch":
        raise UsageError(f"--patch applies to --method patch only, not {spec.name}")
    return spec, built


def _evaluate_each(spec, built, model, images, labels, target, *, ctx, dev, batch_size, seed, keep_examples,
                   per_sample, quiet) -> tuple[list[dict], Any]:
    """Run each built attack (one per budget; the patch attack also its noise control) on the images: the result
    rows and the first budget's :class:`attacks.Report` (with its examples when ``keep_examples``)."""
    rows, first = [], None
    with output.progress(quiet) as bar:
        for atk in built:
            task = bar.add_task(f"{spec.name} eps={_fmt(atk.eps) if hasattr(atk, 'eps') else '-'}", total=None)
            report = attacks.evaluate(
                model, (images, labels), [atk], batch_size=batch_size, device=dev, seed=seed, target=target,
                keep_examples=keep_examples and first is None,
                progress=lambda _name, done, total, task=task: bar.update(task, completed=done, total=total),
                shard=ctx.shard,
            )
            first = first or report
            rows.append({"eps": getattr(atk, "eps", None), **report.to_dict(per_sample=per_sample)})
            if spec.name == "patch":  # the control: a same-size uniform-noise patch, a fresh one per image
                control = attacks.evaluate(model, (images, labels), [dataclasses.replace(atk, noise=True)],
                                           batch_size=batch_size, device=dev, seed=seed, target=target,
                                           shard=ctx.shard)
                rows.append({"eps": None, "control": "noise", **control.to_dict(per_sample=per_sample)})
    return rows, first


def _render(spec: attacks.AttackSpec, rows: list[dict], *, targeted: bool, json_out: bool,
            save_examples: Optional[Path], header: dict[str, Any]) -> None:
    """Print the results: one JSON document, or the table, the warnings and where the examples went."""
    if json_out:
        output.emit_json({**header, "method": spec.name, "targeted": targeted, "results": rows})
        return
    output.stdout.print(_table(spec.name, rows, targeted, spec.kind))
    for w in rows[0]["warnings"]:
        output.stderr.print(f"[yellow]warning:[/] {w}")
    if save_examples is not None:
        output.stdout.print(f"examples written to {save_examples}")


def attacks_cmd(
    name: Annotated[Optional[str], typer.Argument(
        metavar="[METHOD]", help="Describe this attack's parameters: type, default, option, help.")] = None,
    kind: Annotated[Optional[str], typer.Option(help="Only this kind: " + ", ".join(attacks.KINDS) + ".")] = None,
    json_out: Json = False,
) -> None:
    """List the registered attacks with their kind, norms, targeted mode, a one-line description and their
    parameters; `robustcnn attacks METHOD` describes each parameter of one attack."""
    if name is not None:
        if kind is not None:
            raise UsageError("give a METHOD or --kind, not both")
        spec = _spec(name)
        if json_out:
            output.emit_json(_describe(spec))
        else:
            output.stdout.print(_parameter_table(spec))
        return
    try:
        names = attacks.available(kind)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    specs = [attacks.get(nm) for nm in names]
    if json_out:
        output.emit_json([_describe(s) for s in specs])
        return
    t = Table(title="Registered attacks (`robustcnn attacks METHOD` describes the parameters of one)",
              title_justify="left")
    for col in ("name", "kind", "norms", "targeted", "description", "parameters"):
        t.add_column(col)
    for s in specs:
        t.add_row(s.name, s.kind, ", ".join(s.norms), "yes" if s.targeted else "no", s.description,
                  ", ".join(s.params))
    output.stdout.print(t)
    if kind is None:
        suites = Table(title="Suites of `robustcnn report --suite NAME` (cascade order)", title_justify="left")
        suites.add_column("suite")
        suites.add_column("attacks")
        for nm in attacks.suite_names():
            suites.add_row(nm + (" (default)" if nm == attacks.DEFAULT_SUITE else ""), attacks.describe_suite(nm))
        output.stdout.print(suites)


def _option(name: str) -> str:
    """The ``robustcnn attack`` option that sets parameter ``name``."""
    if name in OWN_OPTION:
        return OWN_OPTION[name].split(" (")[0]
    short = [o for o, f in SHORTCUTS.items() if f == name]
    return f"--{short[0]}" if short else f"--param {name}="


def _describe(spec: attacks.AttackSpec) -> dict[str, Any]:
    """One attack as JSON: kind, norms, targeted mode, description, and each parameter's type, default, help."""
    return {"name": spec.name, "kind": spec.kind, "norms": list(spec.norms), "targeted": spec.targeted,
            "description": spec.description,
            "params": {p.name: {"type": p.type_name, "default": p.default, "help": p.help, "runtime": p.runtime,
                                "option": _option(p.name)} for p in spec.parameters}}


def _parameter_table(spec: attacks.AttackSpec) -> Table:
    t = Table(title=f"{spec.name} ({spec.kind}; norms {', '.join(spec.norms)}; targeted "
                    f"{'yes' if spec.targeted else 'no'}): {spec.description}", title_justify="left",
              caption="runtime: how the work is split, never what is computed", caption_justify="left")
    for col in ("parameter", "type", "default", "option"):
        t.add_column(col, no_wrap=True)
    t.add_column("help", ratio=1)
    for p in spec.parameters:
        t.add_row(p.name + (" [dim](runtime)[/]" if p.runtime else ""), p.type_name, str(p.default),
                  _option(p.name), p.help)
    return t
