"""The cascade against running every attack of a suite separately on all samples.

    python benchmarks/bench_report.py [--checkpoint PATH] [--suite standard] [--eps 0.1] [--n 500]

Prints, side by side from one run, the wall time and the worst-case robust accuracy of (a) the cascade, where each
attack only sees the samples still robust, and (b) every attack run on every correctly classified sample, the
worst case taken per sample afterwards. Because each sample draws from its own random stream, (a) and (b) must
find exactly the same robust samples; only the cost differs.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import load_trained  # noqa: I001  (first: puts the repo on sys.path)

import attacks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--suite", default=attacks.DEFAULT_SUITE)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--norm", default="linf")
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    model, x, y, path = load_trained(args.checkpoint, args.n)
    suite = attacks.build_suite(args.suite, eps=args.eps, norm=args.norm)
    suite = [a for a in suite if a.kind not in attacks.suites.OTHER_THREAT_MODELS]
    print(f"model: {path}  samples: {len(y)}  suite: {args.suite} = {', '.join(a.name for a in suite)}  "
          f"eps={args.eps} ({args.norm})\n")

    t0 = time.perf_counter()
    cascade = attacks.evaluate(model, (x, y), suite, seed=0)
    t_cascade = time.perf_counter() - t0

    robust = cascade.clean_correct.clone()
    t_sep, rows = 0.0, []
    for atk in suite:
        t0 = time.perf_counter()
        rep = attacks.evaluate(model, (x, y), [atk], seed=0)
        dt = time.perf_counter() - t0
        t_sep += dt
        robust &= rep.robust
        rows.append((atk.name, rep.robust_accuracy, dt))

    print(f"{'attack alone':<14} {'robust acc':>10} {'time':>8}")
    for name, acc, dt in rows:
        print(f"{name:<14} {acc:>10.2%} {dt:>7.1f}s")
    print()
    print(f"{'':<28} {'worst-case robust acc':>22} {'time':>8}")
    print(f"{'cascade':<28} {cascade.robust_accuracy:>22.2%} {t_cascade:>7.1f}s")
    print(f"{'separately, worst per sample':<28} {robust.float().mean().item():>22.2%} {t_sep:>7.1f}s")
    same = torch.equal(robust, cascade.robust)
    print(f"\ncascade speed-up: {t_sep / t_cascade:.2f}x; same robust samples: {same}")
    for name, st in cascade.per_attack.items():
        print(f"  cascade {name:<10} saw {st.seen:>5} samples, fooled {st.successes:>5}, {st.seconds:6.1f}s")


if __name__ == "__main__":
    main()
