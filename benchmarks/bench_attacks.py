"""White-box attack speed, side by side on the same model and batch (issue 3).

    python benchmarks/bench_attacks.py [--checkpoint PATH] [--n 1000] [--batch-size 250]

1. PGD-k overhead: PGD-k wall time / (k x one forward + backward to the input). Target <= 1.05.
2. Early exit: robust-accuracy evaluation with PGD that stops working on fooled samples vs. the conventional one
   that runs every step on every sample, at an eps where most samples fall. Target >= 2x faster, same accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import load_trained  # noqa: I001  (first: puts the repo on sys.path)

import attacks  # noqa: E402


def forward_backward(model, x, y):
    xg = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
    torch.autograd.grad(loss, xg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--eps", type=float, default=0.1)
    args = ap.parse_args()
    model, x, y, path = load_trained(args.checkpoint, args.n)
    print(f"model: {path}  samples: {len(y)}  torch threads: {torch.get_num_threads()}")

    xb, yb = x[: args.batch_size], y[: args.batch_size]
    print(f"\n1) PGD-k overhead on one batch of {len(yb)} (eps={args.eps}, every sample takes every step)")
    print("   each repeat times k forward+backward passes and PGD-k back to back; ratio = median of the repeats")
    print(f"   {'k':>4} {'PGD-k':>10} {'k x fwd+bwd':>12} {'ratio':>7}")
    forward_backward(model, xb, yb)  # warm-up
    for k in (10, 20, 50):
        atk = attacks.PGD(eps=args.eps, steps=k, early_stop=False)
        floor, pgd = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(k):
                forward_backward(model, xb, yb)
            floor.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            atk(model, xb, yb)
            pgd.append(time.perf_counter() - t0)
        ratio = statistics.median(p / f for p, f in zip(pgd, floor))
        print(f"   {k:>4} {statistics.median(pgd) * 1e3:>8.1f}ms {statistics.median(floor) * 1e3:>10.1f}ms {ratio:>7.3f}")

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
