"""The default suite against the standard suite and torchattacks' AutoAttack: robust accuracy, passes, wall time.

    python benchmarks/bench_suite.py --model plain=CKPT --model pgd=CKPT[@EPS] ... [--n 200] [--eps 0.1]
                                     [--suites adaptive,standard] [--masked pgd] [--report] [--json FILE]

For every model (a robustcnn checkpoint, or anything `robustcnn.load_model` reads), on its first N test images at
Linf ``eps`` (or the model's own ``@EPS``), in one process and one after the other: each named suite through
``attacks.evaluate`` and torchattacks' ``AutoAttack(version="standard")`` (when installed: ``pip install
torchattacks``, the ``bench`` extra). Every method runs on the same model wrapped in one pass counter, so the
forward passes (images through the model) and backward passes (input gradients) of both libraries are counted by the
same instrument; the suites' own exact counts (``Report.passes``) are checked against it. Printed per model: robust
accuracy, passes, wall time, ratios to AutoAttack, the samples one method fooled and the other did not, and a
verdict for the default suite (robust accuracy no higher than AutoAttack's, at most a third of its time and of its
passes).

torchattacks' AutoAttack runs its APGD, APGD-T and FAB for 10 iterations (its defaults), not the paper's 100;
``--paper-autoattack`` adds a row ``aa-100`` with the same four attacks at 100 iterations, the protocol that the
``standard`` suite follows.

``--masked NAME`` adds model NAME behind input rounding to 1/255 (predictions unchanged to the eye, every input
gradient exactly zero: a model with masked gradients); ``--report`` also runs the whole ``robustcnn report`` of
the default suite (with its sanity checks and gradient-masking probes) and prints its passes and time beside the
suite's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from _common import PassCounter  # noqa: I001  (first: puts the repo on sys.path)

import attacks  # noqa: E402


class Rounded(nn.Module):
    """The model on inputs rounded to multiples of 1/255: the same images to the eye, zero input gradients."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 255) / 255)


def load(spec: str, n: int):
    """(name, model in eval mode, x in [0, 1], y, eps or None) for ``NAME=PATH[@EPS]``: the model's dataset, its
    first ``n`` test images, and the model's own budget when given."""
    from robustcnn import load_data, load_model

    name, _, path = spec.partition("=")
    path, _, eps = path.partition("@")
    model, meta = load_model(path)
    data = load_data(meta.get("dataset") or "fashion-mnist", split="test", limit=n)
    return name, model.eval(), data.images.float().div(255), data.labels, float(eps) if eps else None


def run_suite(counter: PassCounter, x, y, suite: str, eps: float, seed: int) -> dict:
    counter.reset()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = attacks.evaluate(counter, (x, y), attacks.build_suite(suite, eps=eps), seed=seed)
    seconds = time.perf_counter() - t0
    assert rep.passes == {"forward": counter.forward_passes, "backward": counter.backward_passes}, \
        (rep.passes, counter.forward_passes, counter.backward_passes)
    stages = {k: {"fooled": v.successes, "seen": v.seen, "forward": v.forward_passes, "backward": v.backward_passes,
                  "seconds": round(v.seconds, 2), "skipped": v.skipped} for k, v in rep.per_attack.items()}
    return {"robust": rep.robust, "forward": counter.forward_passes, "backward": counter.backward_passes,
            "seconds": seconds, "stages": stages}


def autoattack(model: nn.Module, eps: float, seed: int, steps: int | None):
    """torchattacks' AutoAttack (standard): as shipped (``steps=None``: its APGD, APGD-T and FAB run torchattacks'
    default of 10 iterations), or with every iteration count set to ``steps`` (100: the paper's protocol)."""
    import torchattacks as ta

    if steps is None:
        return ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=seed)
    return ta.MultiAttack([
        ta.APGD(model, eps=eps, norm="Linf", seed=seed, loss="ce", n_restarts=1, steps=steps),
        ta.APGDT(model, eps=eps, norm="Linf", seed=seed, n_classes=10, n_restarts=1, steps=steps),
        ta.FAB(model, eps=eps, norm="Linf", seed=seed, multi_targeted=True, n_classes=10, n_restarts=1, steps=steps),
        ta.Square(model, eps=eps, norm="Linf", seed=seed, n_queries=5000, n_restarts=1),
    ])


def run_autoattack(counter: PassCounter, x, y, eps: float, seed: int, batch_size: int,
                   steps: int | None = None) -> dict:
    counter.reset()
    t0 = time.perf_counter()
    robust = []
    for s in range(0, len(y), batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        adv = autoattack(counter, eps, seed, steps)(xb, yb)
        with torch.no_grad():
            robust.append(counter.inner(adv).argmax(1) == yb)
    seconds = time.perf_counter() - t0
    return {"robust": torch.cat(robust), "forward": counter.forward_passes, "backward": counter.backward_passes,
            "seconds": seconds}


def run_whole_report(model: nn.Module, x, y, eps: float, seed: int) -> dict:
    from robustcnn.report import ReportRequest, run_report

    request = ReportRequest(suite=attacks.DEFAULT_SUITE, attacks=None, eps=[eps], norm="linf", n=len(y), seed=seed,
                            dataset="fashion-mnist", checkpoint_sha256="0" * 64)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc, _ = run_report(model, x, y, request, Path(tmp) / "r", device=torch.device("cpu"), batch_size=250)
    return {"seconds": time.perf_counter() - t0, "passes": doc["passes"], "warnings": doc["warnings"],
            "robust_accuracy": doc["results"][0]["robust_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH; repeat for several models")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suites", default=f"{attacks.DEFAULT_SUITE},standard", help="comma-separated suite names")
    ap.add_argument("--masked", default=None, help="NAME of a model to add behind input rounding")
    ap.add_argument("--masked-only", action="store_true", help="with --masked: run only the masked model")
    ap.add_argument("--no-autoattack", action="store_true")
    ap.add_argument("--paper-autoattack", action="store_true",
                    help="also torchattacks' AutoAttack with the paper's 100 iterations (row aa-100)")
    ap.add_argument("--report", action="store_true", help="also run the whole report of the default suite")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); 1 on a "
                    "shared machine, where a multi-threaded operation waits for its slowest thread")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    torch.manual_seed(0)
    models = []
    for spec in args.model:
        name, model, x, y, eps = load(spec, args.n)
        if not (args.masked_only and name == args.masked):
            models.append((name, model, x, y, eps or args.eps))
        if name == args.masked:
            models.append((f"{name}+masked", Rounded(model), x, y, eps or args.eps))
    print(f"{args.n} test images, Linf eps {args.eps} unless given per model, seed {args.seed}, "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    out = {}
    for name, model, x, y, eps in models:
        counter = PassCounter(model.eval()).eval()
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
        rows = {s: run_suite(counter, x, y, s, eps, args.seed) for s in suites}
        if not args.no_autoattack:
            rows["autoattack"] = run_autoattack(counter, x, y, eps, args.seed, batch_size=250)
            if args.paper_autoattack:
                rows["aa-100"] = run_autoattack(counter, x, y, eps, args.seed, batch_size=250, steps=100)
        whole = run_whole_report(model, x, y, eps, args.seed) if args.report else None
        out[name] = _print_model(f"{name} (eps {eps:g})", clean, rows, whole)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def _print_model(name: str, clean: float, rows: dict, whole) -> dict:
    ref = rows.get("autoattack")
    print(f"== {name}: clean accuracy {clean:.2%}")
    print(f"   {'method':<12} {'robust':>8} {'forward':>11} {'backward':>11} {'passes':>11} {'time':>8}"
          f" {'time/AA':>8} {'passes/AA':>9}")
    summary = {"clean": clean}
    for method, r in rows.items():
        passes = r["forward"] + r["backward"]
        acc = r["robust"].float().mean().item()
        t_ratio = r["seconds"] / ref["seconds"] if ref else float("nan")
        p_ratio = passes / (ref["forward"] + ref["backward"]) if ref else float("nan")
        print(f"   {method:<12} {acc:>8.2%} {r['forward']:>11,} {r['backward']:>11,} {passes:>11,} "
              f"{r['seconds']:>7.1f}s {t_ratio:>8.3f} {p_ratio:>9.3f}")
        summary[method] = {"robust_accuracy": acc, "forward": r["forward"], "backward": r["backward"],
                           "seconds": r["seconds"], "time_over_aa": t_ratio, "passes_over_aa": p_ratio,
                           "stages": r.get("stages")}
    for method, r in rows.items():
        if "stages" in r:
            print(f"   {method} stages: " + "; ".join(_stage(k, v) for k, v in r["stages"].items()))
    if ref is not None:
        for method, r in rows.items():
            if method == "autoattack":
                continue
            only_aa = int((~ref["robust"] & r["robust"]).sum())
            only_us = int((ref["robust"] & ~r["robust"]).sum())
            print(f"   {method}: AutoAttack fooled {only_aa} sample(s) it did not; "
                  f"it fooled {only_us} AutoAttack did not")
        d = summary[attacks.DEFAULT_SUITE] if attacks.DEFAULT_SUITE in summary else None
        if d is not None:
            ok = (d["robust_accuracy"] <= summary["autoattack"]["robust_accuracy"] + 1e-9,
                  d["time_over_aa"] <= 1 / 3, d["passes_over_aa"] <= 1 / 3)
            print(f"   verdict {attacks.DEFAULT_SUITE}: robust <= AutoAttack {_yn(ok[0])}, time <= 1/3 {_yn(ok[1])}, "
                  f"passes <= 1/3 {_yn(ok[2])}")
            summary["verdict"] = dict(zip(("robust", "time", "passes"), ok))
        if "standard" in summary:
            s = summary["standard"]
            print(f"   standard costs no more than AutoAttack: time {_yn(s['time_over_aa'] <= 1)}, "
                  f"passes {_yn(s['passes_over_aa'] <= 1)}")
        if "standard" in summary and "aa-100" in summary:
            s, p = summary["standard"], summary["aa-100"]
            print(f"   standard costs no more than AutoAttack at the paper's 100 iterations: time "
                  f"{_yn(s['seconds'] <= p['seconds'])} ({s['seconds'] / p['seconds']:.3f}), passes "
                  f"{_yn(s['forward'] + s['backward'] <= p['forward'] + p['backward'])} "
                  f"({(s['forward'] + s['backward']) / (p['forward'] + p['backward']):.3f})")
    if whole is not None:
        t = whole["passes"]["total"]
        print(f"   whole report ({attacks.DEFAULT_SUITE}, with its sanity checks): robust "
              f"{whole['robust_accuracy']:.2%}, {t['forward']:,} forward + {t['backward']:,} backward passes, "
              f"{whole['seconds']:.1f}s; {len(whole['warnings'])} warning(s)")
        for w in whole["warnings"]:
            print(f"     - {w}")
        summary["report"] = whole
    print()
    return summary


def _stage(name: str, st: dict) -> str:
    done = "skipped" if st["skipped"] else f"{st['fooled']}/{st['seen']}"
    return f"{name} {done} {st['forward'] + st['backward']:,} passes {st['seconds']}s"


def _yn(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    main()
