"""Robustness reports: a suite of attacks as a cascade per budget, sanity checks, files people can share.

A report folder holds ``report.json`` (everything: request, model hash, versions, per-attack and per-sample
results, warnings), ``report.md`` (the tables), ``accuracy_vs_eps.png`` and ``gallery.png``, ``report.html`` (all of
it on one self-contained page, see :mod:`robustcnn.html`), and ``state.pt``, the
resume state: after every finished (budget, attack) stage the state is saved atomically, so an interrupted report
continues where it stopped. A folder holding a report of another model or request is refused, never overwritten,
and so is a folder holding a file of one of these names that robustcnn did not write. While a report is written, its
folder is held (:func:`hold_folder`), so a second report into the same folder fails at once instead of mixing in.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

import attacks
from attacks.base import ModelState, model_dtype
from attacks.evaluate import (SANITY_SAMPLES, ProgressFn, Shard, StageResult, cascade, correctly_classified,
                              run_stage, sanity_passes, sanity_warnings)
from attacks.suites import OTHER_THREAT_MODELS
from robustcnn.checkpoint import versions
from robustcnn.distributed import SINGLE, DistContext
from robustcnn.errors import CheckpointError, UsageError
from robustcnn.fsutil import OutputLock, atomic_write, refuse_foreign
from robustcnn.jsonutil import json_safe

STATE = "state.pt"
#: Every file a report folder may hold.
REPORT_FILES = ("report.json", "report.md", "report.html", "accuracy_vs_eps.png", "gallery.png", STATE)
BLACK_BOX = ("score", "decision")


@dataclass(frozen=True)
class ReportRequest:
    """What the user asked for; a resumed report must ask for exactly the same."""

    suite: Optional[str]
    attacks: Optional[list[str]]
    eps: list[float]
    norm: str
    n: int
    seed: int
    checkpoint_sha256: str
    dataset: str
    each_alone: bool = False  # also run each attack alone (the first attack's cascade result is its alone result)


#: The budget most papers use per dataset and norm (pixel units of [0, 1]), as the user would write it.
USUAL_EPS = {
    "linf": {"mnist": "0.3", "fashion-mnist": "0.1", "cifar10": "8/255", "svhn": "8/255", "shapes": "8/255"},
    "l2": {"mnist": "2.0", "fashion-mnist": "1.5", "cifar10": "0.5", "svhn": "0.5", "shapes": "0.5"},
}


def usual_eps(dataset: str, norm: str) -> str:
    """The usual budget for ``dataset`` under ``norm`` (``linf`` or ``l2``): 8/255 resp. 0.5 for other datasets."""
    return USUAL_EPS[norm].get(dataset.strip().lower(), USUAL_EPS[norm]["cifar10"])


def default_folder(request: ReportRequest) -> Path:
    """``reports/<dataset>-<model hash>-<suite>-<request hash>``: one folder per request, so running the same
    request again resumes it."""
    key = hashlib.sha256(json.dumps(request.__dict__, sort_keys=True).encode()).hexdigest()[:8]
    return Path("reports") / f"{request.dataset}-{request.checkpoint_sha256[:8]}-{request.suite or 'custom'}-{key}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_folder(out: Path, request: ReportRequest) -> dict:
    """Create ``out`` or reopen it for resuming; returns the saved state (empty for a new report). A folder with a
    file of :data:`REPORT_FILES`'s names that robustcnn did not write is refused (:class:`ForeignFileError`)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    refuse_foreign(*(out / name for name in REPORT_FILES))
    state_file = out / STATE
    if not state_file.exists():
        if (out / "report.json").exists():
            raise UsageError(f"{out} already holds a finished report; choose another --out")
        return {"request": asdict(request), "stages": {}, "done": False}
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: never overwrite what we cannot read
        raise CheckpointError(f"cannot read the resume state {state_file}: {exc}; choose another --out") from None
    if not isinstance(state, dict) or not isinstance(state.get("request"), dict) or "stages" not in state:
        raise CheckpointError(f"{state_file} is not a robustcnn report state: choose another --out "
                              "(nothing was changed)")
    if state.get("request") != asdict(request):
        old = state.get("request", {})
        what = "model" if old.get("checkpoint_sha256") != request.checkpoint_sha256 else "request"
        raise UsageError(f"{out} holds a report of another {what}; choose another --out (nothing was changed)")
    return state


def hold_folder(out: Path, held: ExitStack, dist: DistContext = SINGLE) -> None:
    """Hold the report folder ``out`` until ``held`` closes (an :class:`OutputLock`, taken by rank 0 of a distributed
    run): a second report into it fails at once with :class:`OutputBusyError`, on every rank alike."""
    def take() -> None:
        held.enter_context(OutputLock(out))

    dist.on_main(take)


class _Saver:
    def __init__(self, out: Path, state: dict, enabled: bool = True):
        self.path, self.state, self.enabled = out / STATE, state, enabled

    def save(self) -> None:
        if self.enabled:  # rank 0 of a distributed run, or the only process
            atomic_write(self.path, lambda f: torch.save(self.state, f))


#: What the report says for a budget of 0, where no attack runs.
NO_ATTACK_AT_ZERO = "No perturbation is allowed at eps 0: no attack runs, and robust accuracy is clean accuracy."


def report_suite(suite: Optional[str], names: Optional[list[str]], eps: float, norm: str) -> list[attacks.Attack]:
    """The attacks a report runs at budget ``eps``: the suite (or ``names``) from :func:`attacks.build_suite`. At
    eps 0 nothing may be perturbed, so only the attacks not bounded by eps remain (built at a small budget, which
    they ignore, so that names are still checked); raises ``ValueError`` like ``build_suite``."""
    built = attacks.build_suite(suite, attack_names=names, eps=eps if eps > 0 else 1 / 255, norm=norm)
    return built if eps > 0 else [a for a in built if a.kind in OTHER_THREAT_MODELS]


def _stage_key(eps_i: int, attack_i: int) -> str:
    return f"{eps_i}:{attack_i}"


#: Called as ``on_stage(key)`` after a stage ran and was saved in the resume state under ``key``.
OnStage = Callable[[str], None]


class _Stages:
    """The finished stages of the resume state: each added one is saved at once, then announced."""

    def __init__(self, state: dict, saver: _Saver, on_stage: Optional[OnStage]):
        self.done, self.saver, self.on_stage = state["stages"], saver, on_stage

    def add(self, key: str, entry: dict) -> None:
        self.done[key] = entry
        self.saver.save()
        if self.on_stage is not None:
            self.on_stage(key)

    def once(self, key: str, run: Callable[[], dict]) -> dict:
        """The entry saved under ``key``; ``run()`` makes it when no earlier run did."""
        if key not in self.done:
            self.add(key, run())
        return self.done[key]


def _fooled(entry: dict) -> Tensor:
    """The indices of the samples a saved stage fooled."""
    return entry["idx"][entry["fooled"]]


def run_report(model: nn.Module, x: Tensor, y: Tensor, request: ReportRequest, out: Path, *,
               device: torch.device, batch_size: int, progress: Optional[ProgressFn] = None,
               on_stage: Optional[OnStage] = None, dist: DistContext = SINGLE,
               ) -> tuple[dict, Optional[tuple[Tensor, Tensor]]]:
    """Run (or resume) the report. Returns the ``report.json`` document and the gallery examples
    ``(indices, adversarial images)`` fooled at the smallest positive eps (or None).

    Every budget is one :func:`attacks.evaluate.cascade` of the suite's bounded attacks, each stage saved in the
    resume state as soon as it ran; ``on_stage(key)`` is called after each save (an interruption raised there
    leaves a folder that the same call resumes). Stages found in the state are not run again, and a resumed
    report is the uninterrupted one, sample by sample.

    Distributed (every rank calls it with the same arguments): rank 0 prepares the folder and sends the resume
    state to the others; every stage's samples are split over the ranks and the per-sample results gathered, so
    every rank holds the state one process would have, and rank 0 alone saves it. The document is the same as
    one process's, sample by sample, whatever the number of processes or the batch size."""
    state = dist.on_main(lambda: prepare_folder(out, request))
    saver = _Saver(out, state, enabled=dist.is_main)
    x = x.to(model_dtype(model) or x.dtype)
    run = _Run(model, x, y, request, device=device, batch_size=batch_size, progress=progress, shard=dist.shard,
               stages=_Stages(state, saver, on_stage))
    start = time.perf_counter()
    saved = ModelState(model)
    model.eval()
    try:
        clean = correctly_classified(model, x, y, batch_size=batch_size, device=device, shard=dist.shard)
        if "checks" not in state:
            state["checks"], state["checks_passes"] = run.checks()
            saver.save()
        notes = list(state["checks"])
        results = [run.budget(ei, eps, clean) for ei, eps in enumerate(request.eps)]
        others = run.other_threat_models(clean)
        certified = certify_results(model, x, y, results, request.norm, device=device, batch_size=batch_size)
    finally:
        saved.restore()

    notes += _consistency_warnings(results, len(y))
    notes += [f"soundness error: {len(r['soundness_errors'])} sample(s) IBP-verified at eps {r['eps']:g} but fooled "
              f"or misclassified (first: {r['soundness_errors'][0]}); not counted as certified"
              for r in results if r["soundness_errors"]]
    doc = {
        "request": asdict(request), "n": len(y), "clean_accuracy": clean.float().mean().item(),
        "results": results, "certified": certified, "other_threat_models": others, "warnings": notes,
        "passes": report_passes(state, len(y)),
        "seconds_this_run": time.perf_counter() - start, "versions": versions(),
    }
    return doc, gallery_examples(state["stages"], request)


@dataclass(frozen=True)
class _Run:
    """One run of a report: the model, the data, the request and how to run its stages."""

    model: nn.Module
    x: Tensor
    y: Tensor
    request: ReportRequest
    device: torch.device
    batch_size: int
    progress: Optional[ProgressFn]
    shard: Optional[Shard]
    stages: _Stages

    def checks(self) -> tuple[list[str], list[int]]:
        """The sanity checks: model-level warnings, and gradient-masking probes at the largest budget; with the
        (forward, backward) passes they made."""
        main_eps = max([e for e in self.request.eps if e > 0], default=0.0)
        first = min(len(self.y), SANITY_SAMPLES)
        notes = sanity_warnings(self.model, self.x[:first].to(self.device), self.y[:first].to(self.device))
        passes = list(sanity_passes(first))
        if main_eps > 0:
            more, spent = attack_checks(self.model, self.x, self.y, eps=main_eps, norm=self.request.norm,
                                        device=self.device, seed=self.request.seed, batch_size=self.batch_size,
                                        shard=self.shard)
            notes += more
            passes = [passes[0] + spent[0], passes[1] + spent[1]]
        return notes, passes

    def _suite(self, eps: float) -> list[attacks.Attack]:
        return report_suite(self.request.suite, self.request.attacks, eps, self.request.norm)

    def _stage(self, atk: attacks.Attack, idx: Tensor) -> StageResult:
        return run_stage(self.model, self.x, self.y, idx, atk, atk.name, batch_size=self.batch_size,
                         device=self.device, seed=self.request.seed, progress=self.progress, shard=self.shard)

    def budget(self, ei: int, eps: float, clean: Tensor) -> dict:
        """The cascade of the bounded attacks at ``eps`` (the ``ei``-th budget), and each attack alone. At eps 0
        no perturbation is allowed: no attack runs and robust accuracy is clean accuracy."""
        bounded = [a for a in self._suite(eps) if a.kind not in OTHER_THREAT_MODELS]
        keys = [_stage_key(ei, ai) for ai in range(len(bounded))]

        def save(ai: int, stage: StageResult) -> None:
            self.stages.add(keys[ai], {
                "idx": stage.idx, "fooled": stage.fooled, "norms": stage.norms, "queries": stage.queries,
                "x_adv": stage.x_adv[stage.fooled] if stage.x_adv is not None else None,
                "stats": {**stage.stats.to_dict(), "kind": bounded[ai].kind},
            })

        finished = {ai: _fooled(self.stages.done[k]) for ai, k in enumerate(keys) if k in self.stages.done}
        result = cascade(self.model, self.x, self.y, bounded, start=clean, names=[a.name for a in bounded],
                         batch_size=self.batch_size, device=self.device, seed=self.request.seed,
                         keep_examples=ei == _gallery_index(self.request.eps), progress=self.progress,
                         shard=self.shard, finished=finished, on_stage=save)
        for ai, atk in enumerate(bounded[1:] if self.request.each_alone else [], start=1):
            if self.stages.done[keys[ai]]["stats"].get("skipped"):
                continue  # an escalation the cascade did not need has no accuracy alone
            # the attack alone: with per-sample streams its results on the samples it saw are the cascade's,
            # so it only has to meet the samples earlier attacks had already fooled
            earlier = ((result.fooled_by >= 0) & (result.fooled_by < ai)).nonzero().squeeze(1)
            self.stages.once(keys[ai] + ":alone", lambda: _fooled_mask(self._stage(atk, earlier)))
        return _eps_result(eps, ei, bounded, self.stages.done, clean, result.robust, result.fooled_by)

    def other_threat_models(self, clean: Tensor) -> list[dict]:
        """Patch and pixel attacks of the suite: each on every correctly classified sample, reported on its own."""
        rows = []
        for ai, atk in enumerate(a for a in self._suite(max(self.request.eps)) if a.kind in OTHER_THREAT_MODELS):
            def measure() -> dict:
                stage = self._stage(atk, clean.nonzero().squeeze(1))
                return {"stats": {**stage.stats.to_dict(), "kind": atk.kind},
                        "accuracy": (clean.sum() - stage.fooled.sum()).item() / len(self.y)}

            entry = self.stages.once(f"other:{ai}", measure)
            rows.append({**entry["stats"], "accuracy_under_attack": entry["accuracy"]})
        return rows


def _fooled_mask(stage: StageResult) -> dict:
    return {"idx": stage.idx, "fooled": stage.fooled,
            "passes": [stage.stats.forward_passes, stage.stats.backward_passes]}


def report_passes(state: dict, n: int) -> dict:
    """Every forward and backward pass of the model the report made, exactly, by purpose: ``suite`` (the attacks
    of the cascades), ``alone`` (each attack run again on the samples earlier attacks fooled, for its accuracy
    alone), ``other`` (patch and pixel attacks), ``checks`` (sanity checks and gradient-masking probes) and
    ``clean`` (classifying every sample once); ``total`` adds them up. (Passes of a resumed report's earlier runs
    count too.)"""
    parts = {"suite": [0, 0], "alone": [0, 0], "other": [0, 0], "checks": list(state.get("checks_passes", [0, 0])),
             "clean": [n, 0]}
    for key, entry in state["stages"].items():
        if key.startswith("other:"):
            spent = [entry["stats"]["forward_passes"], entry["stats"]["backward_passes"]]
            part = "other"
        elif key.endswith(":alone"):
            spent, part = entry.get("passes", [0, 0]), "alone"
        else:
            spent, part = [entry["stats"]["forward_passes"], entry["stats"]["backward_passes"]], "suite"
        parts[part] = [parts[part][0] + spent[0], parts[part][1] + spent[1]]
    out = {k: {"forward": int(f), "backward": int(b)} for k, (f, b) in parts.items()}
    out["total"] = {d: sum(v[d] for v in out.values()) for d in ("forward", "backward")}
    return out


def _gallery_index(eps: list[float]) -> int:
    positive = [i for i, e in enumerate(eps) if e > 0]
    return min(positive, key=lambda i: eps[i]) if positive else -1


def _eps_result(eps, ei, bounded, stages, clean, robust, fooled_by) -> dict:
    rows, cumulative, alone = [], [], []
    after = clean.clone()
    for ai, atk in enumerate(bounded):
        st = stages[_stage_key(ei, ai)]
        after[_fooled(st)] = False
        cumulative.append(after.float().mean().item())
        rows.append(st["stats"])
        survivors = clean.clone()
        survivors[_fooled(st)] = False
        extra = stages.get(_stage_key(ei, ai) + ":alone")
        if extra is not None:
            survivors[_fooled(extra)] = False
        measured = ai == 0 or extra is not None  # the first attack alone is the cascade's first stage
        alone.append(survivors.float().mean().item() if measured else float("nan"))
    return {
        "eps": eps, "robust_accuracy": robust.float().mean().item(), "attacks": rows,
        "accuracy_after": cumulative, "accuracy_alone": alone,
        "per_sample": {"robust": robust.tolist(),
                       "fooled_by": [bounded[i].name if i >= 0 else None for i in fooled_by.tolist()]},
    }


def certify_results(model: nn.Module, x: Tensor, y: Tensor, results: list[dict], norm: str, *,
                    device: torch.device, batch_size: int) -> dict:
    """Set a proven lower bound beside each budget's attacked accuracy: IBP-verified samples that the attacks did
    not fool (``certified_accuracy``), and ``soundness_errors``, the indices of samples verified yet fooled or
    misclassified (never counted as certified). ``certified_accuracy`` is None where IBP does not apply (an L2
    budget, or a layer it cannot bound); the returned ``{"method": "ibp", "reason": ...}`` says why."""
    from robustcnn.certify import check_supported, verified

    reason = None if norm == "linf" else "IBP certifies linf budgets only"
    if reason is None:
        try:
            check_supported(model)
        except ValueError as exc:
            reason = str(exc)
    for r in results:
        r["certified_accuracy"], r["soundness_errors"] = None, []
        if reason is not None:
            continue
        proven = torch.cat([verified(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device),
                                     r["eps"]).cpu() for i in range(0, len(y), batch_size)])
        robust = torch.tensor(r["per_sample"]["robust"], dtype=torch.bool)
        r["certified_accuracy"] = (proven & robust).float().mean().item()
        r["soundness_errors"] = (proven & ~robust).nonzero().flatten().tolist()
    return {"method": "ibp", "reason": reason}


def _consistency_warnings(results: list[dict], n: int) -> list[str]:
    """Signs that the numbers cannot be trusted: accuracy rising with eps, black-box beating white-box."""
    out = []
    ordered = sorted(results, key=lambda r: r["eps"])
    for a, b in zip(ordered, ordered[1:]):
        if b["robust_accuracy"] > a["robust_accuracy"] + 1e-12:
            out.append(f"robust accuracy rises with eps ({a['robust_accuracy']:.2%} at {a['eps']:g} -> "
                       f"{b['robust_accuracy']:.2%} at {b['eps']:g}): the attacks are not converging")
    for r in results:
        white_done = False
        for st in r["attacks"]:
            if st["kind"] == "white-box":
                white_done = True
            elif st["kind"] in BLACK_BOX and white_done and st["successes"] > max(1, 0.005 * n):
                out.append(f"black-box {st['name']} fooled {st['successes']} samples that every white-box attack "
                           f"missed at eps={r['eps']:g}: a sign of gradient masking")
    return out


#: How many points more accuracy FGSM may leave than PGD-10 before the report calls it masking. On normally and
#: PGD-trained Fashion-MNIST models the gap is 3-26 points (eps 0.02-0.1); after catastrophic overfitting, 57.
SINGLE_STEP_GAP = 0.30


def attack_checks(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, device: torch.device,
                  seed: int, batch_size: int, probe_n: int = 200, shard=None) -> tuple[list[str], list[int]]:
    """Three probes for gradient masking on the first ``probe_n`` samples: more PGD steps must not help the model;
    FGSM must not leave far more accuracy than PGD-10 (or more than the clean accuracy); and an unbounded PGD
    (eps = 1 Linf, or the whole image diagonal in L2) must reach ~0 % accuracy. Returns the warnings and the
    (forward, backward) passes the probes made."""
    out = []
    xs, ys = x[:probe_n], y[:probe_n]
    spent = [0, 0]

    def acc(atk):
        with warnings.catch_warnings():  # the report records the model-level warnings once, elsewhere
            warnings.simplefilter("ignore")
            rep = attacks.evaluate(model, (xs, ys), [atk], batch_size=batch_size, device=device, seed=seed,
                                   shard=shard)
        spent[0] += rep.passes["forward"]
        spent[1] += rep.passes["backward"]
        return rep.robust_accuracy

    few, many = acc(attacks.PGD(eps=eps, norm=norm, steps=10)), acc(attacks.PGD(eps=eps, norm=norm, steps=50))
    if many > few + 1e-12:
        out.append(f"PGD-50 leaves higher accuracy than PGD-10 at eps={eps:g} ({many:.1%} vs {few:.1%}): "
                   "the loss surface is masked or the attack diverges")
    single = acc(attacks.FGSM(eps=eps, norm=norm))
    clean = float(correctly_classified(model, xs, ys, batch_size=batch_size, device=device, shard=shard)
                  .float().mean())
    spent[0] += len(ys)
    if single > clean + 1e-12 or (single - few > SINGLE_STEP_GAP and single >= clean / 2):
        out.append(f"FGSM leaves {single:.1%} accuracy at eps={eps:g} but PGD-10 only {few:.1%} (clean "
                   f"{clean:.1%}): single-step attacks see a masked loss surface, the mark of catastrophic "
                   "overfitting in single-step adversarial training; trust only multi-step and black-box numbers")
    big = 1.0 if norm == "linf" else math.sqrt(float(np.prod(x.shape[1:])))
    unbounded = acc(attacks.PGD(eps=big, norm=norm, steps=50))
    if unbounded > 0.02:
        out.append(f"an unbounded PGD (eps={big:g}) still leaves {unbounded:.1%} accuracy: attacks cannot even "
                   "reach arbitrary images, a sign of gradient masking")
    return out, spent


def write_report(out: Path, doc: dict, *, classes: list[str], gallery: Optional[Callable[[Path], None]]) -> None:
    """Write report.json, report.md, accuracy_vs_eps.png (and gallery.png), then report.html (every picture
    embedded) into ``out``; then drop the state."""
    from robustcnn.html import write_html
    from robustcnn.plots import save_curves

    atomic_write(out / "report.json", lambda f: f.write(json.dumps(json_safe(doc), indent=1).encode()))
    atomic_write(out / "report.md", lambda f: f.write(render_markdown(doc).encode()))
    ordered = sorted(doc["results"], key=lambda r: r["eps"])
    eps = [r["eps"] for r in ordered]
    curves = {}
    if ordered and ordered[0]["attacks"]:
        for i, st in enumerate(ordered[0]["attacks"]):
            values = [r["accuracy_alone"][i] for r in ordered]
            if any(v is not None and v == v for v in values):  # measured alone at some budget (not NaN)
                curves[f"{st['name']} alone"] = [float("nan") if v is None else v for v in values]
    curves["worst case (all attacks)"] = [r["robust_accuracy"] for r in ordered]
    if ordered and all(r.get("certified_accuracy") is not None for r in ordered):
        curves["IBP-certified (proven lower bound)"] = [r["certified_accuracy"] for r in ordered]
    save_curves(out / "accuracy_vs_eps.png", eps, curves,
                title=f"{doc['request']['dataset']}: accuracy under attack ({doc['request']['norm']})",
                xlabel=f"eps ({doc['request']['norm']}, pixel units of [0, 1])")
    if gallery is not None:
        gallery(out / "gallery.png")
    write_html(out, doc)  # last: it embeds the pictures above
    state = out / STATE
    if state.exists():
        state.unlink()


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f} %"


def _num(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _passes(v) -> str:
    return "-" if v is None else f"{int(v):,}"


def render_markdown(doc: dict) -> str:
    req = doc["request"]
    lines = [
        f"# Robustness report: {req['dataset']}",
        "",
        f"- model sha256: `{req['checkpoint_sha256'][:16]}…`",
        f"- samples: {doc['n']}, seed {req['seed']}, norm {req['norm']}, suite {req['suite'] or ', '.join(req['attacks'])}",
        f"- clean accuracy: **{_pct(doc['clean_accuracy'])}**",
        "",
        "| eps | worst-case robust accuracy (attacked, upper bound) | IBP-certified accuracy (proven, lower bound) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['eps']:g} | {_pct(r['robust_accuracy'])} | {_pct(r.get('certified_accuracy'))} |"
              for r in sorted(doc["results"], key=lambda r: r["eps"])]
    reason = doc.get("certified", {}).get("reason")
    if reason:
        lines += ["", f"IBP certification not available: {reason}."]
    for r in doc["results"]:
        if not r["attacks"]:
            lines += ["", f"## eps = {r['eps']:g}", "", NO_ATTACK_AT_ZERO]
            continue
        lines += ["", f"## eps = {r['eps']:g} (cascade: each attack sees only the samples still robust)", "",
                  "| attack | kind | seen | success rate | accuracy after | accuracy alone | queries mean / median "
                  "| passes forward / backward | max norm | time |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for st, after, alone in zip(r["attacks"], r["accuracy_after"], r["accuracy_alone"]):
            seen = "skipped (the attack before it gave no reason)" if st.get("skipped") else st["seen"]
            lines.append(f"| {st['name']} | {st['kind']} | {seen} | {_pct(st['success_rate'])} | {_pct(after)} "
                         f"| {_pct(alone)} "
                         f"| {_num(st['queries_mean'])} / {_num(st['queries_median'])} "
                         f"| {_passes(st.get('forward_passes'))} / {_passes(st.get('backward_passes'))} "
                         f"| {_num(st['max_norm'])} | {st['seconds']:.1f} s |")
    if doc["other_threat_models"]:
        lines += ["", "## Other threat models (not bounded by eps)", "",
                  "| attack | kind | accuracy under attack | success rate | median size |", "|---|---|---:|---:|---:|"]
        for st in doc["other_threat_models"]:
            lines.append(f"| {st['name']} | {st['kind']} | {_pct(st['accuracy_under_attack'])} "
                         f"| {_pct(st['success_rate'])} | {_num(st['median_norm'])} |")
    if doc.get("passes"):
        p = doc["passes"]
        lines += ["", "## Cost in passes of the model (forward / backward, over all samples)", "",
                  "| " + " | ".join(p) + " |", "|" + "---:|" * len(p),
                  "| " + " | ".join(f"{_passes(v['forward'])} / {_passes(v['backward'])}" for v in p.values()) + " |"]
    lines += ["", "## Sanity checks", ""]
    lines += [f"- ⚠ {w}" for w in doc["warnings"]] or ["- no warning: no sign of gradient masking was found"]
    return "\n".join(lines) + "\n"


def gallery_examples(doc_state_stages: dict, request: ReportRequest) -> Optional[tuple[Tensor, Tensor]]:
    """(indices, adversarial images) fooled at the smallest positive eps, from the saved stages."""
    ei = _gallery_index(request.eps)
    if ei < 0:
        return None
    idx, xs = [], []
    for key, st in doc_state_stages.items():
        if key.startswith(f"{ei}:") and st.get("x_adv") is not None:
            idx.append(st["idx"][st["fooled"]])
            xs.append(st["x_adv"])
    if not idx:
        return None
    return torch.cat(idx), torch.cat(xs)
