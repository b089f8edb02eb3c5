"""White-box attack speed, side by side on the same model and batch.

    python benchmarks/bench_attacks.py [--checkpoint PATH] [--n 1000] [--batch-size 250] [--eps 0.1]
                                       [--steps 10,20,50] [--repeats 7] [--threads N] [--clock wall|cpu]
                                       [--skip-early-exit]

1. PGD-k overhead: PGD-k wall time / (k x one forward + backward to the input). Target <= 1.05.
   The baseline is the bare minimum a k-step gradient attack must pay: ``torch.autograd.grad`` of a summed
   cross-entropy with respect to the input, on the same model and batch, nothing else (no copy of the batch). PGD-k
   (``early_stop=False``: every sample takes every step) is timed two ways: ``atk.perturb`` (the examples only,
   what adversarial training calls: k gradient passes plus the random start and the projected steps) and ``atk(...)``
   (the full result, which also pays one forward pass on the last iterate to learn ``success``); the "floor" column
   is ``1 + forward / (k x forward+backward)``, the part of the full call's ratio that this forward pass alone
   costs. Baseline and attack are timed interleaved, in rotating order, and the figures are medians of the
   per-repeat ratios, so drifting load on a shared machine cancels out. A machine whose speed changes within
   seconds still moves them; the "in-run" columns cannot be moved that way: every run is repeated on the model
   wrapped in ``_common.TimedModel``, which clocks the model's own forward and backward passes, and each run's
   time is divided by the time inside the model in that same run. The attack's such ratio over the baseline's is
   what the ratio would be if the model ran equally fast in both; the full call's is multiplied by its model time
   over its model time less the success check's forward pass (its own floor, measured in the same run).
2. Early exit: robust-accuracy evaluation with PGD that stops working on fooled samples vs. the conventional one
   that runs every step on every sample, at an eps where most samples fall. Target >= 2x faster, same accuracy.

On a shared machine use ``--threads 1``: with other processes on the cores, every multi-threaded operation waits
for its slowest thread, which inflates small operations far more than the model's large ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import CLOCKS, TimedModel, load_trained  # noqa: I001  (first: puts the repo on sys.path)

import attacks  # noqa: E402
from robustcnn.perf import keep_freed_memory  # noqa: E402


def forward_backward(model, x, y):
    """One forward pass and one backward pass to the input only: the unit of work of a gradient attack."""
    xg = x.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
    torch.autograd.grad(loss, xg)


def forward(model, x):
    with torch.no_grad():
        model(x)


clock = CLOCKS["wall"]


def _timed(fn) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def _in_run(timed: TimedModel, fn) -> tuple[float, float]:
    """(``fn``'s time / the time it spent inside ``timed``, the share of that model time that builds no graph)."""
    timed.seconds = timed.no_grad_seconds = 0.0
    total = _timed(fn)
    return total / timed.seconds, timed.no_grad_seconds / timed.seconds


def pgd_overhead(model, xb, yb, eps: float, ks: list[int], repeats: int) -> None:
    print(f"\n1) PGD-k overhead on one batch of {len(yb)} (eps={eps}, every sample takes every step)")
    print(f"   baseline: k x (forward + torch.autograd.grad to the input); interleaved, {repeats} repeats, medians, "
          f"{'CPU' if clock is time.process_time else 'wall'} time")
    print(f"   {'k':>4} {'k x fwd+bwd':>12} {'perturb':>10} {'ratio':>7} {'atk(...)':>10} {'ratio':>7} "
          f"{'(min..max)':>15} {'floor':>7} {'best/best':>17} {'in-run':>15} {'(min..max)':>15}")
    timed = TimedModel(model, clock).eval()
    forward_backward(model, xb, yb)  # warm-up
    for k in ks:
        atk = attacks.PGD(eps=eps, steps=k, early_stop=False)
        atk(model, xb, yb)  # warm-up
        atk.perturb(model, xb, yb)
        times: dict[str, list[float]] = {"base": [], "perturb": [], "call": []}
        in_run: dict[str, list[tuple[float, float]]] = {"base": [], "perturb": [], "call": []}
        fwd = []

        def run_base(net, k=k):
            for _ in range(k):
                forward_backward(net, xb, yb)

        runs = [("base", run_base), ("perturb", lambda net: atk.perturb(net, xb, yb)),
                ("call", lambda net: atk(net, xb, yb))]
        for r in range(repeats):
            for name, fn in runs[r % 3:] + runs[: r % 3]:  # rotate the order: drift cancels
                times[name].append(_timed(lambda: fn(model)))
                in_run[name].append(_in_run(timed, lambda: fn(timed)))
            fwd.append(_timed(lambda: forward(model, xb)))
        r_perturb = [p / b for p, b in zip(times["perturb"], times["base"])]
        r_call = [p / b for p, b in zip(times["call"], times["base"])]
        # drift-free estimates: each run's own time over its own time inside the model, relative to the baseline's;
        # the full call's model time also holds the success check's forward pass, which its 1 / (1 - share) adds
        e_perturb = [p[0] / b[0] for p, b in zip(in_run["perturb"], in_run["base"])]
        e_call = [c[0] / b[0] / (1 - c[1]) for c, b in zip(in_run["call"], in_run["base"])]
        floor = 1 + statistics.median(fwd) / statistics.median(times["base"])
        med = statistics.median
        print(f"   {k:>4} {med(times['base']) * 1e3:>10.1f}ms {med(times['perturb']) * 1e3:>8.1f}ms "
              f"{med(r_perturb):>7.3f} {med(times['call']) * 1e3:>8.1f}ms {med(r_call):>7.3f} "
              f"{f'({min(r_call):.3f}..{max(r_call):.3f})':>15} {floor:>7.3f} "
              f"{min(times['perturb']) / min(times['base']):>8.3f} {min(times['call']) / min(times['base']):>8.3f} "
              f"{med(e_perturb):>7.3f} {med(e_call):>7.3f} {f'({min(e_call):.3f}..{max(e_call):.3f})':>15}")
    print("   ratios: medians of the per-repeat ratios to the baseline; (min..max): spread of the full call's ratio;")
    print("   best/best: the fastest perturb and full call over the repeats / the fastest baseline (interference only")
    print("   ever slows a run down, so the fastest of many repeats is the least disturbed estimate);")
    print("   floor: 1 + one forward / (k x forward+backward), the share of the final iterate's forward pass (the")
    print("   success check of the full call), which no k-step attack that reports success can avoid;")
    print("   in-run: perturb and full call again, each run's time over the time inside the model in that same run,")
    print("   divided by the baseline's own such ratio, times (for the full call) its model time over its model time")
    print("   less the success check: the ratio the machine would show if its speed did not drift between runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", default="10,20,50", help="comma-separated k values for part 1")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats per k in part 1")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="part 1 timer: wall time, or this process's CPU time (steadier on a busy machine; with "
                         "--threads 1 it is the work done)")
    ap.add_argument("--skip-early-exit", action="store_true", help="run part 1 only")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc settings alone (the CLI's commands keep freed memory for reuse)")
    args = ap.parse_args()
    tuned = not args.default_malloc and keep_freed_memory()  # the same for the baseline and the attacks
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y, path = load_trained(args.checkpoint, args.n)
    print(f"model: {path}  samples: {len(y)}  torch threads: {torch.get_num_threads()}  "
          f"malloc: {'keeps freed memory' if tuned else 'default'}")

    xb, yb = x[: args.batch_size], y[: args.batch_size]
    pgd_overhead(model, xb, yb, args.eps, [int(k) for k in args.steps.split(",")], args.repeats)
    if args.skip_early_exit:
        return

    print(f"\n2) robust accuracy with PGD-20 at eps={args.eps} on {len(y)} samples, batch {args.batch_size}")
    rows = []
    for label, early in (("early exit", True), ("every step on every sample", False)):
        atk = attacks.PGD(eps=args.eps, steps=20, early_stop=early)
        t0 = time.perf_counter()
        rep = attacks.evaluate(model, (x, y), [atk], batch_size=args.batch_size, seed=0)
        rows.append((label, time.perf_counter() - t0, rep.robust_accuracy, rep.per_attack["pgd"].gradients_mean))
    for label, t, acc, g in rows:
        print(f"   {label:<28} {t:7.2f}s  robust acc {acc:.2%}  backward passes/sample {g:.1f}")
    print(f"   speed-up of early exit: {rows[1][1] / rows[0][1]:.2f}x  "
          f"(robust accuracy difference {abs(rows[0][2] - rows[1][2]) * 100:.2f} points)")


if __name__ == "__main__":
    main()
