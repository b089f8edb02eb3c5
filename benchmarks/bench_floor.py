"""Every query-based attack against its forward floor, and one-pixel against torchattacks' OnePixel.

    python benchmarks/bench_floor.py [--checkpoint PATH] [--n 500] [--n-pixel 100] [--n-patch 50] [--repeats 3]
                                     [--threads 1]
                                     [--clock cpu|wall] [--attacks onepixel,greedyl0,...] [--sizes 16,32,...,1024]
                                     [--population 99] [--generations 30] [--skip-torchattacks]

On a shared machine use ``--threads 1 --clock cpu`` (the defaults): with one thread, this process's CPU time is the
work it did, whatever the neighbours do.

1. The floor. For each query-based attack (one-pixel DE, greedy L0, Square, SimBA, NES, SPSA, Boundary,
   HopSkipJump L2/Linf, the universal patch and LaVAN), the attack runs on the first correctly classified test
   images as :func:`attacks.evaluate` would hand them over, on the model wrapped in a recorder of every model call
   (its batch size, and whether a gradient is taken through it). Two bare replays of those passes follow, with
   nothing else: (a) the same calls, at the sizes the attack used; (b) the same number of images at the best
   batch size for this device: forward-only images in calls of the size whose forward pass was fastest per image,
   gradient images (forward + backward to the input) in calls of the size fastest for that, both measured at
   ``--sizes`` at the start. Attack, (a) and (b) run interleaved, ``--repeats`` times (order rotated), and the
   figure is the median of the per-repeat ratios attack / (b), with their range. Target: at most 1.15x.
   "vs (a)" is the attack's own overhead at its own call sizes; "(a)/(b)" what its call sizes cost over the best.
2. One-pixel at population ``--population`` x ``--generations`` generations (F = 0.5) against
   ``torchattacks.OnePixel(pixels=1, steps=generations, popsize=...)`` with the same number of candidates per image
   per generation (torchattacks runs SciPy-style DE: its population is ``max(1, popsize // (2 + C)) * (2 + C)`` for
   one pixel of C channels, so popsize 99 gives 99 candidates on grey images), on the same images, interleaved and
   repeated: success rate, forward passes per image (counted by the same instrument for both) and time.
   torchattacks is a benchmark-only dependency (``pip install .[bench]``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

import attacks
from attacks.rng import sample_keys

try:  # run as a script from the repository root or from benchmarks/
    from _common import CLOCKS, PassCounter, load_trained
except ImportError:  # pragma: no cover
    from benchmarks._common import CLOCKS, PassCounter, load_trained

clock: Callable[[], float] = CLOCKS["cpu"]

TARGET = 1.15


class Recorder(nn.Module):
    """The wrapped model, recording each call as ``(batch size, whether the input carries a gradient)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x):
        self.calls.append((x.shape[0], bool(x.requires_grad)))
        return self.inner(x)


def attack_run(atk: attacks.Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Attack ``x`` in the calls :func:`attacks.evaluate` makes; returns (success, queries, seconds, model calls)."""
    rec = Recorder(model).eval()
    per_call = atk.samples_per_call(batch_size)
    ok, q = [], []
    t0 = clock()
    for first in range(0, len(y), per_call):
        part = torch.arange(first, min(first + per_call, len(y)))
        res = atk(rec, x[part], y[part], generator=sample_keys(0, part))
        ok.append(res.success)
        q.append(res.queries)
    return torch.cat(ok), torch.cat(q), clock() - t0, rec.calls


def _grad_pass(model: nn.Module, x: torch.Tensor) -> None:
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        torch.autograd.grad(model(xg).sum(), xg)


def replay(model: nn.Module, pool: torch.Tensor, calls: list[tuple[int, bool]]) -> float:
    """Seconds of bare model calls of exactly ``calls`` (images from ``pool``)."""
    t0 = clock()
    for size, grad in calls:
        if grad:
            _grad_pass(model, pool[:size])
        else:
            with torch.no_grad():
                model(pool[:size])
    return clock() - t0


def at_best(calls: list[tuple[int, bool]], best_fwd: int, best_grad: int) -> list[tuple[int, bool]]:
    """The images of ``calls`` regrouped into calls of the best size (forward-only and gradient images apart)."""
    out = []
    for grad, size in ((False, best_fwd), (True, best_grad)):
        total = sum(s for s, g in calls if g == grad)
        out += [(size, grad)] * (total // size) + ([(total % size, grad)] if total % size else [])
    return out


def best_sizes(model: nn.Module, pool: torch.Tensor, sizes: list[int], repeats: int = 3):
    """Per-image seconds of a forward pass and of a forward + backward pass at each size (medians of ``repeats``
    interleaved rounds of about 2,048 images each); returns (fastest forward size, fastest gradient size, table)."""
    fwd: dict[int, list[float]] = {s: [] for s in sizes}
    grad: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(repeats):
        for s in sizes:
            calls = max(1, 2048 // s)
            fwd[s].append(replay(model, pool, [(s, False)] * calls) / (calls * s))
            calls = max(1, 1024 // s)
            grad[s].append(replay(model, pool, [(s, True)] * calls) / (calls * s))
    f = {s: statistics.median(v) for s, v in fwd.items()}
    g = {s: statistics.median(v) for s, v in grad.items()}
    return min(f, key=f.get), min(g, key=g.get), f, g


def attack_list(eps: float, queries: int, only: tuple[str, ...], population: int, generations: int):
    runs = [
        ("onepixel", attacks.OnePixel(pixels=1, population=population, steps=generations)),
        ("greedyl0", attacks.GreedyL0(pixels=10)),
        ("square", attacks.Square(eps=eps, max_queries=queries)),
        ("simba-dct", attacks.SimBA(eps=eps, basis="dct", max_queries=queries)),
        ("simba-pixel", attacks.SimBA(eps=eps, basis="pixel", max_queries=queries)),
        ("nes", attacks.NES(eps=eps, max_queries=queries)),
        ("spsa", attacks.SPSA(eps=eps, max_queries=queries)),
        ("boundary", attacks.Boundary(max_queries=queries)),
        ("hopskipjump-l2", attacks.HopSkipJump(max_queries=queries)),
        ("hopskipjump-linf", attacks.HopSkipJump(norm="linf", max_queries=queries)),
        ("patch", attacks.UniversalPatch(area=0.05)),
        ("lavan", attacks.LocalizedPatch(area=0.05)),
    ]
    return [(label, atk) for label, atk in runs if not only or label in only]


def floor_section(model, x, y, args, pool) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    best_fwd, best_grad, f, g = best_sizes(model, pool, sizes)
    print(f"\n1) attack time / bare passes of the same queries at the best batch size; target <= {TARGET}x")
    print("   per-image time of bare passes by batch size (us; forward / forward+backward to the input):")
    print("   " + "  ".join(f"{s}: {f[s] * 1e6:.0f}/{g[s] * 1e6:.0f}" for s in sizes))
    print(f"   best: forward at {best_fwd}, forward+backward at {best_grad}")
    print(f"   {'attack':<17} {'n':>4} {'success':>8} {'q/img':>8} {'rows/call':>9} {'time':>8} "
          f"{'vs (b) best':>11} {'(min..max)':>13} {'vs (a)':>7} {'(a)/(b)':>7}  verdict")
    only = tuple(a for a in args.attacks.split(",") if a)
    for label, atk in attack_list(args.eps, args.queries, only, args.population, args.generations):
        n = {"onepixel": args.n_pixel, "greedyl0": args.n_pixel, "patch": args.n_patch, "lavan": args.n_patch}.get(
            label, args.n)
        xs, ys = x[:n], y[:n]
        times, vs_best, vs_same, same_best = [], [], [], []
        for r in range(args.repeats):
            # rotate the order of attack, (a) and (b): drift between them cancels over the repeats
            order = ("atk", "a", "b")[r % 3:] + ("atk", "a", "b")[: r % 3]
            if r == 0:
                order = ("atk", "a", "b")  # the replays need the attack's calls
            t: dict[str, float] = {}
            for what in order:
                if what == "atk":
                    ok, q, t["atk"], calls = attack_run(atk, model, xs, ys, args.batch_size)
                elif what == "a":
                    t["a"] = replay(model, pool, calls)
                else:
                    t["b"] = replay(model, pool, at_best(calls, best_fwd, best_grad))
            times.append(t["atk"])
            vs_best.append(t["atk"] / t["b"])
            vs_same.append(t["atk"] / t["a"])
            same_best.append(t["a"] / t["b"])
        ratio = statistics.median(vs_best)
        rows = sum(s for s, _ in calls) / len(calls)
        print(f"   {label:<17} {len(ys):>4} {ok.float().mean():>8.1%} {q.float().mean():>8.0f} {rows:>9.0f} "
              f"{statistics.median(times):>7.2f}s {ratio:>10.3f}x {f'({min(vs_best):.3f}..{max(vs_best):.3f})':>13} "
              f"{statistics.median(vs_same):>6.3f}x {statistics.median(same_best):>6.3f}x  "
              f"{'meets' if ratio <= TARGET else 'MISS'}", flush=True)
    print("   (rows/call: mean images per model call of the attack; time: median attack time, "
          f"{'CPU' if clock is time.process_time else 'wall'} time)")


def torchattacks_section(model, x, y, args) -> None:
    import torchattacks  # benchmark-only dependency

    c = x.shape[1]
    popsize = args.population  # torchattacks' population: max(1, popsize // (2 + c)) * (2 + c)
    population = max(1, popsize // (2 + c)) * (2 + c)
    xs, ys = x[: args.n_pixel], y[: args.n_pixel]
    print(f"\n2) one-pixel, {population} candidates per image per generation, {args.generations} generations, on "
          f"{len(ys)} correctly classified images (torchattacks popsize={popsize})")
    ours = attacks.OnePixel(pixels=1, population=population, steps=args.generations)
    counter = PassCounter(model).eval()
    ta = torchattacks.OnePixel(counter, pixels=1, steps=args.generations, popsize=popsize)
    rows: dict[str, list] = {"ours": [], "torchattacks": []}
    for r in range(args.ta_repeats):
        for who in (("ours", "torchattacks") if r % 2 == 0 else ("torchattacks", "ours")):
            counter.reset()
            if who == "ours":
                t0 = clock()
                ok, q = [], []
                for first in range(0, len(ys), args.batch_size):
                    part = torch.arange(first, min(first + args.batch_size, len(ys)))
                    res = ours(counter, xs[part], ys[part], generator=sample_keys(0, part))
                    ok.append(res.success)
                seconds = clock() - t0
                success = torch.cat(ok).float().mean().item()
            else:
                torch.manual_seed(0)
                import numpy as np
                np.random.seed(0)
                t0 = clock()
                adv = ta(xs, ys)
                seconds = clock() - t0
                with torch.no_grad():
                    success = (model(adv).argmax(1) != ys).float().mean().item()
            rows[who].append((success, counter.forward_passes / len(ys), seconds))
    print(f"   {'':<13} {'success':>8} {'fwd/img':>8} {'time':>8} {'(min..max)':>16}")
    for who, rs in rows.items():
        ts = [r[2] for r in rs]
        print(f"   {who:<13} {rs[-1][0]:>8.1%} {rs[-1][1]:>8.0f} {statistics.median(ts):>7.2f}s "
              f"{f'({min(ts):.2f}..{max(ts):.2f})':>16}")
    ratios = [a[2] / b[2] for a, b in zip(rows["ours"], rows["torchattacks"])]
    print(f"   ours / torchattacks: {statistics.median(ratios):.3f}x ({min(ratios):.3f}..{max(ratios):.3f}) "
          f"{'meets' if statistics.median(ratios) <= 1.0 else 'MISS'} (target <= 1.0)")
    print("   (fwd/img counts every forward pass through the model, its success checks included; torchattacks' "
          "success is re-predicted on its output)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/work/models/plain/fashion-mnist-vgg.pt")
    ap.add_argument("--n", type=int, default=500, help="correctly classified test images per score or decision attack")
    ap.add_argument("--n-pixel", type=int, default=100, help="images for one-pixel (both sections) and greedy L0")
    ap.add_argument("--n-patch", type=int, default=50, help="images for the patch attacks")
    ap.add_argument("--eps", type=float, default=0.1, help="Linf budget of the score-based attacks")
    ap.add_argument("--queries", type=int, default=1000, help="query budget of the score and decision attacks")
    ap.add_argument("--population", type=int, default=99)
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--sizes", default="16,32,64,128,256,512,1024", help="batch sizes measured for the floor")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved attack / replay repeats per attack")
    ap.add_argument("--ta-repeats", type=int, default=2, help="interleaved repeats of ours / torchattacks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    ap.add_argument("--attacks", default="", help="comma-separated labels of section 1 (default: all)")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--skip-torchattacks", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    model, x, y, path = load_trained(args.checkpoint, 2 * max(args.n, args.n_pixel, args.n_patch) + 100)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x, y = x[correct], y[correct]
    print(f"model: {path}  torch threads: {torch.get_num_threads()}  clock: {args.clock}")
    pool = x.repeat(1024 // len(x) + 1, 1, 1, 1)[:1024]
    if not args.skip_floor:
        floor_section(model, x, y, args, pool)
    if not args.skip_torchattacks:
        torchattacks_section(model, x, y, args)


if __name__ == "__main__":
    main()
