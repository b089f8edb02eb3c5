"""Black-box attacks on a trained model: queries to success, and the cost of a query.

    python benchmarks/bench_blackbox.py [--checkpoint PATH] [--n 1000] [--n-decision 200] [--eps 0.1]
                                        [--queries 1000] [--batch-size 250] [--rows-per-call N] [--repeats 1]
                                        [--threads N] [--clock wall|cpu] [--skip-decision]
                                        [--attacks square,simba-dct,...]

On a shared machine use ``--threads 1 --clock cpu``: with other processes on the cores, every multi-threaded
operation waits for its slowest thread, and wall time measures the neighbours as much as the attack.

1. Score-based attacks at Linf ``eps`` with ``queries`` per image, on the test images the model classifies
   correctly, next to white-box PGD-20: success rate, and the distribution of queries to success (median, mean,
   90th percentile over the fooled images). Target: Square within 5 points of PGD-20, median queries < 100.
   Cost of a query, in the same table: the attack's time per 1000 queries per image ("s/1000q/img"), and its
   overhead: attack time / the time of the same forward passes run bare ("vs bare fwd"). The bare baseline replays
   exactly the model calls the attack's oracle made (same number of images, same batch sizes: the oracle splits
   large queries into calls of ``rows_per_call`` rows, and calls shrink as images are fooled) with nothing else;
   the attack and the replay run interleaved ``--repeats`` times and the figure is the median ratio. Target
   <= 1.2x. "fwd@B" is the same time relative to bare forward passes at the oracle's full call size B, for
   reference (it also charges the attack for its small calls near the end).
2. Decision-based attacks with the same budget, unbounded: the median norm reached (L2, and Linf for
   HopSkipJump-Linf). Target: HopSkipJump below Boundary in L2.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
from torch import nn

import attacks
from attacks.oracle import default_rows_per_call
from attacks.rng import sample_keys

try:  # run as a script from the repository root or from benchmarks/
    from _common import CLOCKS, TimedModel, best_time, load_trained
except ImportError:  # pragma: no cover
    from benchmarks._common import CLOCKS, TimedModel, best_time, load_trained

clock = CLOCKS["wall"]


def run_batched(atk: attacks.Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Attack ``x`` in the calls :func:`attacks.evaluate` makes (``atk.samples_per_call(batch_size)`` samples each,
    every sample on its own random stream): returns (success, queries, norms, seconds, model calls' sizes, seconds
    inside the model's forward passes).

    The sizes include the referee's passes (decision attacks), which the time includes too."""
    timed = TimedModel(model, clock).eval()
    out = {"success": [], "queries": [], "norms": []}
    per_call = atk.samples_per_call(batch_size)
    t0 = clock()
    for first in range(0, len(y), per_call):
        part = torch.arange(first, min(first + per_call, len(y)))
        res = atk(timed, x[part], y[part], generator=sample_keys(0, part))
        for key in out:
            out[key].append(getattr(res, key))
    seconds = clock() - t0
    return (*(torch.cat(v) for v in out.values()), seconds, timed.sizes, timed.seconds)


def replay(model: nn.Module, pool: torch.Tensor, sizes: list[int]) -> float:
    """Time of bare forward passes with exactly the batch sizes in ``sizes`` (images from ``pool``)."""
    t0 = clock()
    with torch.no_grad():
        for size in sizes:
            model(pool[:size])
    return clock() - t0


def distribution(q: torch.Tensor) -> str:
    if q.numel() == 0:
        return f"{'-':>7} {'-':>7} {'-':>7}"
    a = q.double().numpy()
    return f"{np.median(a):>7.0f} {a.mean():>7.1f} {np.percentile(a, 90):>7.0f}"


def score_section(model, x, y, eps: float, queries: int, batch_size: int, rows_per_call: int, repeats: int,
                  only: tuple[str, ...] = ()) -> None:
    print(f"\n1) score-based at Linf eps={eps}, {queries} queries/image, on {len(y)} correctly classified images, "
          f"batch {batch_size} ({attacks.Square(eps=eps).samples_per_call(batch_size)} per attack call, as in "
          f"attacks.evaluate), oracle calls of at most {rows_per_call} rows")
    pgd = run_batched(attacks.PGD(eps=eps, steps=20), model, x, y, batch_size)
    print(f"   white-box PGD-20: success {pgd[0].float().mean():.2%}")
    pool = x.repeat((rows_per_call + len(x) - 1) // len(x) + 1, 1, 1, 1)[: max(rows_per_call, batch_size)]
    with torch.no_grad():
        t_full = best_time(lambda: model(pool[:rows_per_call]), repeats=5) / rows_per_call
    print(f"   bare forward pass: {t_full * 1e6:.1f} us/image at batch {rows_per_call} "
          f"({'CPU' if clock is time.process_time else 'wall'} time)")
    print(f"   {'attack':<12} {'success':>8} {'median':>7} {'mean':>7} {'p90':>7}   {'s/1000q/img':>11} "
          f"{'vs bare fwd':>11} {'(min..max)':>15} {'fwd@B':>6} {'in-run':>7}")
    runs = [("square", attacks.Square(eps=eps, max_queries=queries)),
            ("simba-dct", attacks.SimBA(eps=eps, basis="dct", max_queries=queries)),
            ("simba-pixel", attacks.SimBA(eps=eps, basis="pixel", max_queries=queries)),
            ("nes", attacks.NES(eps=eps, max_queries=queries)),
            ("spsa", attacks.SPSA(eps=eps, max_queries=queries))]
    for label, atk in runs:
        if only and label not in only:
            continue
        atk = dataclasses.replace(atk, rows_per_call=rows_per_call)
        times, ratios, in_run = [], [], []
        for r in range(repeats):
            if r % 2 == 0:  # alternate the order: drift cancels
                ok, q, _, seconds, sizes, in_model = run_batched(atk, model, x, y, batch_size)
                bare = replay(model, pool, sizes)
            else:
                bare = replay(model, pool, sizes)
                ok, q, _, seconds, sizes, in_model = run_batched(atk, model, x, y, batch_size)
            times.append(seconds)
            ratios.append(seconds / bare)
            in_run.append(seconds / in_model)
        seconds = statistics.median(times)
        per_1000 = seconds / q.sum().item() * 1000
        spread = f"({min(ratios):.2f}..{max(ratios):.2f})" if repeats > 1 else ""
        print(f"   {label:<12} {ok.float().mean():>8.2%} {distribution(q[ok])}   {per_1000 * 1e3:>9.1f}ms "
              f"{statistics.median(ratios):>10.2f}x {spread:>15} {per_1000 / (1000 * t_full):>5.2f}x "
              f"{statistics.median(in_run):>6.2f}x")
    print("   (median/mean/p90: queries to success over the fooled images; vs bare fwd: attack time / the same model")
    print("   calls run bare, the overhead figure; in-run: attack time / the time inside its own model calls, from the")
    print("   same run, so machine drift between the attack and its replay cannot move it)")


def decision_section(model, x, y, queries: int, batch_size: int) -> None:
    if len(y) == 0:
        return
    print(f"\n2) decision-based, unbounded, {queries} queries/image, on {len(y)} correctly classified images")
    print(f"   {'attack':<16} {'found':>7} {'median':>8} {'mean':>8} {'p90':>8} {'time':>8}")
    for label, atk in (("hopskipjump-l2", attacks.HopSkipJump(max_queries=queries)),
                       ("boundary-l2", attacks.Boundary(max_queries=queries)),
                       ("hopskipjump-linf", attacks.HopSkipJump(norm="linf", max_queries=queries))):
        ok, _, norms, seconds, _, _ = run_batched(atk, model, x, y, batch_size)
        a = norms[ok].double().numpy()
        print(f"   {label:<16} {ok.float().mean():>7.1%} {np.median(a):>8.3f} {a.mean():>8.3f} "
              f"{np.percentile(a, 90):>8.3f} {seconds:>7.1f}s")
    print("   (norms of the adversarial points found, in the attack's norm)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--n", type=int, default=1000, help="test images for the score-based attacks")
    ap.add_argument("--n-decision", type=int, default=200, help="test images for the decision-based attacks")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--rows-per-call", type=int, help="most query rows per model call (default: the oracle's "
                                                           "measured default for the device)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved attack / bare-replay repeats per attack")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="timer: wall time, or this process's CPU time (steadier on a busy machine)")
    ap.add_argument("--skip-decision", action="store_true", help="run part 1 only")
    ap.add_argument("--attacks", default="", help="comma-separated score-based attacks of part 1 to run (default: all "
                                                  "of square, simba-dct, simba-pixel, nes, spsa)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    model, x, y, path = load_trained(args.checkpoint, max(args.n, args.n_decision))
    report(model, x, y, args, source=str(path))


def report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, source: str) -> None:
    """All three sections on ``model`` (eval mode) and its test images ``x, y``."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    print(f"model: {source}  clean accuracy {correct.float().mean():.2%} on {len(y)}  "
          f"torch threads: {torch.get_num_threads()}")
    xs, ys = x[: args.n][correct[: args.n]], y[: args.n][correct[: args.n]]
    rows = getattr(args, "rows_per_call", None) or default_rows_per_call(x.device)
    only = tuple(a for a in getattr(args, "attacks", "").split(",") if a)
    score_section(model, xs, ys, args.eps, args.queries, args.batch_size, rows, getattr(args, "repeats", 1), only)
    if getattr(args, "skip_decision", False):
        return
    xd, yd = x[: args.n_decision][correct[: args.n_decision]], y[: args.n_decision][correct[: args.n_decision]]
    decision_section(model, xd, yd, args.queries, args.batch_size)


if __name__ == "__main__":
    main()
