"""`robustcnn report`: a suite of attacks as a cascade, eps sweeps, sanity checks, JSON/Markdown/PNG output."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.table import Table

import attacks
from cli import output
from cli.distributed import session
from cli.options import BatchSize, Checkpoint, DataDir, Device, Json, Seed, parse_eps_list, positive
from cli.sources import (Classes, DataChoice, DataSpec, Grayscale, ImageSize, LogitsFromProbs, Mean, ModelChoice,
                         ModelSpec, OutputIndex, Split, Std, Weights, load_sources, model_label)
from robustcnn.errors import RobustCNNError, UsageError


class ReportBelowThreshold(RobustCNNError):
    """--fail-under was not met (exit 1)."""


class ReportInterrupted(RobustCNNError):
    """Ctrl-C, or SIGTERM in a distributed run (exit code 130, like a shell)."""

    exit_code = 130


def _table(doc: dict) -> Table:
    t = Table(title=f"clean accuracy {doc['clean_accuracy']:.2%} on {doc['n']} test images — worst case per sample "
                    "over the cascade", title_justify="left")
    for col in ("eps", "attack", "kind", "seen", "success", "accuracy after", "queries mean/median",
                "passes fwd/bwd", "max norm", "time"):
        t.add_column(col, justify="right" if col not in ("attack", "kind") else "left")
    for r in sorted(doc["results"], key=lambda r: r["eps"]):
        for i, (st, after) in enumerate(zip(r["attacks"], r["accuracy_after"])):
            t.add_row(f"{r['eps']:g}" if i == 0 else "", st["name"], st["kind"],
                      "skipped" if st.get("skipped") else str(st["seen"]),
                      f"{st['success_rate']:.1%}" if st["seen"] else "-", f"{after:.2%}",
                      f"{st['queries_mean']:.4g} / {st['queries_median']:.4g}" if st["seen"] else "-",
                      f"{st['forward_passes']:,} / {st['backward_passes']:,}",
                      f"{st['max_norm']:.4g}", f"{st['seconds']:.1f}s")
        t.add_row("" if r["attacks"] else f"{r['eps']:g}", "[bold]worst case[/]", "", "", "",
                  f"[bold]{r['robust_accuracy']:.2%}[/]", "", "", "", "",
                  end_section=r.get("certified_accuracy") is None)
        if r.get("certified_accuracy") is not None:
            errors = f"[red]{len(r['soundness_errors'])} soundness error(s)[/]" if r["soundness_errors"] else ""
            t.add_row("", "[bold]certified (IBP)[/]", "proven", "", errors, f"[bold]{r['certified_accuracy']:.2%}[/]",
                      "", "", "", "", end_section=True)
    for st in doc["other_threat_models"]:
        t.add_row("-", st["name"], st["kind"], str(st["seen"]), f"{st['success_rate']:.1%}",
                  f"{st['accuracy_under_attack']:.2%}", f"{st['queries_mean']:.4g} / {st['queries_median']:.4g}",
                  f"{st['forward_passes']:,} / {st['backward_passes']:,}", f"{st['max_norm']:.4g}",
                  f"{st['seconds']:.1f}s")
    total = doc.get("passes", {}).get("total")
    if total:
        t.caption = (f"passes of the model in all (suite, sanity checks, clean pass, each attack alone if asked): "
                     f"{total['forward']:,} forward, {total['backward']:,} backward")
        t.caption_justify = "left"
    return t


def report_cmd(
    suite: Annotated[str, typer.Option(help="Attack suite: adaptive (APGD-CE, APGD-T on the top 3 classes, a short "
                                            "Square probe, the full Square only if the probe finds what the gradients "
                                            "missed), quick (FGSM, PGD), standard (AutoAttack's protocol: APGD-CE, "
                                            "APGD-T, DeepFool, Square), full (standard + decision, patch and pixel "
                                            "attacks).")]
    = attacks.DEFAULT_SUITE,
    attack_list: Annotated[Optional[str], typer.Option("--attacks", help="Comma-separated attacks instead of a "
                                                       "suite, run in this order (see `robustcnn attacks`).")] = None,
    eps: Annotated[Optional[str], typer.Option(help="Budgets in [0,1] pixel units, e.g. 0,0.02,0.05,0.1 or 8/255. "
                                               "Default: the dataset's usual one (Fashion-MNIST 0.1 Linf).")] = None,
    norm: Annotated[str, typer.Option(help="Threat model of the budgets: linf or l2.")] = "linf",
    n: Annotated[int, typer.Option("--n", "-n", help="Number of test images (the first N). Under torchrun write -n: torchrun reads --n as one of its own options.")] = 1000,
    out: Annotated[Optional[Path], typer.Option(help="Report folder. Default: reports/<dataset>-<model hash>-... "
                                                "(re-running the same command resumes it).")] = None,
    fail_under: Annotated[Optional[float], typer.Option(help="Exit 1 if the worst-case robust accuracy at any "
                                                        "requested eps is below this fraction (for CI).")] = None,
    each_alone: Annotated[bool, typer.Option("--each-alone", help="Also run every attack after the first on the "
                                             "images earlier ones fooled, for its accuracy alone (more passes).")]
    = False,
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
    """Measure how robust a model is: a cascade of attacks per budget, the per-sample worst case, sanity checks.

    Writes report.json, report.md, accuracy_vs_eps.png and gallery.png into the report folder. An interrupted
    report resumes from the attacks already finished when the same command is run again.
    """
    from robustcnn.report import ReportRequest, default_folder, hold_folder, report_suite, usual_eps

    names = _check_options(suite=suite, attack_list=attack_list, norm=norm, n=n, batch_size=batch_size,
                           fail_under=fail_under, out=out)
    with session(device) as (ctx, dev), ExitStack() as held:
        models = ModelChoice(model_spec, checkpoint, weights, mean, std, output_index, logits_from_probs)
        datas = DataChoice(data, split, image_size, grayscale, classes, data_dir)
        model, meta, data = load_sources(models, datas, dev, limit=n, main_first=ctx.main_first)
        eps_list = parse_eps_list(eps if eps is not None else usual_eps(data.name, norm), norm)
        try:  # every usage error before any work
            for e in eps_list:
                report_suite(None if names else suite, names, e, norm)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        count = min(n, len(data))
        x, y = data.images[:count].float().div(255), data.labels[:count]
        request = ReportRequest(suite=None if names else suite, attacks=names, eps=eps_list, norm=norm, n=count,
                                seed=seed, checkpoint_sha256=meta["sha256"], dataset=data.name, each_alone=each_alone)
        folder = out if out is not None else default_folder(request)
        hold_folder(folder, held, ctx)
        doc, gallery = _run(model, x, y, request, folder, ctx=ctx, dev=dev, batch_size=batch_size,
                            quiet=json_out or not ctx.is_main)
        if not ctx.is_main:  # rank 0 writes the files and prints; the others are done
            return
        doc["model"] = {"checkpoint": model_label(meta), "architecture": meta.get("architecture"),
                        "dataset": data.name, "source": meta["source"], "data": datas.describe(meta)}
        draw = None
        if gallery is not None:
            draw = _gallery_drawer(gallery, x, y, model, list(data.classes), dev)
        _write_and_show(folder, doc, classes=list(data.classes), gallery=draw, json_out=json_out)
        if fail_under is not None:
            worst = min(r["robust_accuracy"] for r in doc["results"])
            if worst < fail_under:
                raise ReportBelowThreshold(f"worst-case robust accuracy {worst:.2%} is below --fail-under {fail_under:.2%}")


def _check_options(*, suite: str, attack_list: Optional[str], norm: str, n: int, batch_size: Optional[int],
                   fail_under: Optional[float], out: Optional[Path]) -> Optional[list[str]]:
    """Usage errors in the options, before any work; returns the --attacks names (None: the suite)."""
    if norm not in ("linf", "l2"):
        raise UsageError(f"--norm must be linf or l2, got {norm!r}")
    positive("--n", n)
    positive("--batch-size", batch_size)
    if fail_under is not None and not 0 <= fail_under <= 1:
        raise UsageError(f"--fail-under must be a fraction in [0, 1], got {fail_under}")
    names = [a.strip() for a in attack_list.split(",") if a.strip()] if attack_list is not None else None
    if names is not None and not names:
        raise UsageError("--attacks needs at least one attack name")
    if names is None and suite not in attacks.SUITES:
        raise UsageError(f"unknown suite {suite!r}: choose one of {', '.join(attacks.SUITES)}")
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    return names


def _run(model, x, y, request, folder: Path, *, ctx, dev, batch_size: Optional[int], quiet: bool):
    """Run (or resume) the report with a progress bar per stage; Ctrl-C becomes :class:`ReportInterrupted`."""
    from robustcnn.device import default_batch_size
    from robustcnn.report import run_report

    with output.progress(quiet) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            key = f"{name}:{total}"
            if key not in tasks:
                tasks[key] = bar.add_task(name, total=total)
            bar.update(tasks[key], completed=done)

        try:
            return run_report(model, x, y, request, folder, device=dev, dist=ctx,
                              batch_size=batch_size or default_batch_size(dev, training=False), progress=progress)
        except KeyboardInterrupt:
            raise ReportInterrupted(f"interrupted: the finished attacks are saved in {folder}/; run the same "
                                    "command again to resume") from None


def _gallery_drawer(gallery, x, y, model, classes: list[str], dev) -> Callable[[Path], None]:
    """Draws the gallery of ``gallery = (indices, adversarial images)`` into a PNG path."""
    from robustcnn.plots import save_grid

    idx, x_adv = gallery
    return lambda p: save_grid(p, x[idx], x_adv, y[idx], model, classes, dev)


def _write_and_show(folder: Path, doc: dict, *, classes: list[str], gallery: Optional[Callable[[Path], None]],
                    json_out: bool) -> None:
    """Write the report's files, then print the JSON document, or the table, the warnings and where it went."""
    from robustcnn.report import write_report

    write_report(folder, doc, classes=classes, gallery=gallery)
    if json_out:
        output.emit_json({**doc, "folder": str(folder)})
        return
    output.stdout.print(_table(doc))
    for w in doc["warnings"]:
        output.stderr.print(f"[yellow]warning:[/] {w}")
    output.stdout.print(f"report written to {folder}/ (report.json, report.md, report.html, accuracy_vs_eps.png"
                        + (", gallery.png)" if gallery else ")"))
