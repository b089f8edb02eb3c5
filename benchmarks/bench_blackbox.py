"""Black-box attacks on a trained model: queries to success, and the cost of a query (issue 4).

    python benchmarks/bench_blackbox.py [--checkpoint PATH] [--n 1000] [--n-decision 200] [--eps 0.1]
                                        [--queries 1000] [--batch-size 250] [--threads N]

On a shared machine run it under the CPU lock; with other processes on the cores, one thread gives steadier ratios.

1. Score-based attacks at Linf ``eps`` with ``queries`` per image, on the test images the model classifies
   correctly, next to white-box PGD-20: success rate, and the distribution of queries to success (median, mean,
   90th percentile over the fooled images). Target: Square within 5 points of PGD-20, median queries < 100.
   Cost of a query, in the same table: the attack's wall time per 1000 queries per image, relative to 1000 bare
   forward passes per image at the full batch size ("vs bare fwd"), and relative to the forward passes the attack
   itself made ("vs own fwd": the batches shrink as images are fooled, so this ratio is the attack's own
   bookkeeping). Target <= 1.2x.
2. Decision-based attacks with the same budget, unbounded: the median norm reached (L2, and Linf for
   HopSkipJump-Linf). Target: HopSkipJump below Boundary in L2.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import attacks

try:  # run as a script from the repository root or from benchmarks/
    from _common import best_time, load_trained
except ImportError:  # pragma: no cover
    from benchmarks._common import best_time, load_trained


class TimedModel(nn.Module):
    """Adds up the wall time of the wrapped model's forward passes."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seconds = 0.0

    def forward(self, x):
        t0 = time.perf_counter()
        out = self.inner(x)
        self.seconds += time.perf_counter() - t0
        return out


def run_batched(atk: attacks.Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Attack ``x`` batch by batch (seeded per batch): returns (success, queries, norms, seconds, forward seconds)."""
    timed = TimedModel(model).eval()
    out = {"success": [], "queries": [], "norms": []}
    t0 = time.perf_counter()
    for i, first in enumerate(range(0, len(y), batch_size)):
        res = atk(timed, x[first:first + batch_size], y[first:first + batch_size],
                  generator=torch.Generator().manual_seed(i))
        for key in out:
            out[key].append(getattr(res, key))
    seconds = time.perf_counter() - t0
    return (*(torch.cat(v) for v in out.values()), seconds, timed.seconds)


def distribution(q: torch.Tensor) -> str:
    if q.numel() == 0:
        return f"{'-':>7} {'-':>7} {'-':>7}"
    a = q.double().numpy()
    return f"{np.median(a):>7.0f} {a.mean():>7.1f} {np.percentile(a, 90):>7.0f}"


def score_section(model, x, y, eps: float, queries: int, batch_size: int, t_fwd_image: float) -> None:
    print(f"\n1) score-based at Linf eps={eps}, {queries} queries/image, on {len(y)} correctly classified images")
    pgd = run_batched(attacks.PGD(eps=eps, steps=20), model, x, y, batch_size)
    print(f"   white-box PGD-20: success {pgd[0].float().mean():.2%}")
    print(f"   {'attack':<12} {'success':>8} {'median':>7} {'mean':>7} {'p90':>7}   {'s/1000q/img':>11} "
          f"{'vs bare fwd':>11} {'vs own fwd':>10}")
    runs = [("square", attacks.Square(eps=eps, max_queries=queries)),
            ("simba-dct", attacks.SimBA(eps=eps, basis="dct", max_queries=queries)),
            ("simba-pixel", attacks.SimBA(eps=eps, basis="pixel", max_queries=queries)),
            ("nes", attacks.NES(eps=eps, max_queries=queries)),
            ("spsa", attacks.SPSA(eps=eps, max_queries=queries))]
    for label, atk in runs:
        ok, q, _, seconds, fwd = run_batched(atk, model, x, y, batch_size)
        per_1000 = seconds / q.sum().item() * 1000
        print(f"   {label:<12} {ok.float().mean():>8.2%} {distribution(q[ok])}   {per_1000 * 1e3:>9.1f}ms "
              f"{per_1000 / (1000 * t_fwd_image):>10.2f}x {seconds / fwd:>9.2f}x")
    print("   (median/mean/p90: queries to success over the fooled images)")


def decision_section(model, x, y, queries: int, batch_size: int) -> None:
    if len(y) == 0:
        return
    print(f"\n2) decision-based, unbounded, {queries} queries/image, on {len(y)} correctly classified images")
    print(f"   {'attack':<16} {'found':>7} {'median':>8} {'mean':>8} {'p90':>8} {'time':>8}")
    for label, atk in (("hopskipjump-l2", attacks.HopSkipJump(max_queries=queries)),
                       ("boundary-l2", attacks.Boundary(max_queries=queries)),
                       ("hopskipjump-linf", attacks.HopSkipJump(norm="linf", max_queries=queries))):
        ok, _, norms, seconds, _ = run_batched(atk, model, x, y, batch_size)
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
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y, path = load_trained(args.checkpoint, max(args.n, args.n_decision))
    report(model, x, y, args, source=str(path))


def report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, source: str) -> None:
    """All three sections on ``model`` (eval mode) and its test images ``x, y``."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    print(f"model: {source}  clean accuracy {correct.float().mean():.2%} on {len(y)}  "
          f"torch threads: {torch.get_num_threads()}")
    xb = x[: args.batch_size]
    with torch.no_grad():
        t_fwd = best_time(lambda: model(xb), repeats=10) / len(xb)
    print(f"bare forward pass: {t_fwd * 1e6:.1f} us/image at batch {len(xb)}")
    xs, ys = x[: args.n][correct[: args.n]], y[: args.n][correct[: args.n]]
    score_section(model, xs, ys, args.eps, args.queries, args.batch_size, t_fwd)
    xd, yd = x[: args.n_decision][correct[: args.n_decision]], y[: args.n_decision][correct[: args.n_decision]]
    decision_section(model, xd, yd, args.queries, args.batch_size)


if __name__ == "__main__":
    main()
