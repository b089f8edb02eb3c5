"""k-pixel attack cost at the paper's settings: wall time and queries per image.

    python benchmarks/bench_pixel.py [--checkpoint PATH] [--n 100] [--pixels 1,3,5] [--batch-size 100]

Runs the differential-evolution k-pixel attack (Su et al. 2019: population 400, up to 100 generations, F = 0.5) on
the correctly classified images among the first N test images of a trained model (the newest `robustcnn train` run
by default), and the white-box greedy L0 attack at the same k for comparison (k steps of one backward pass and 128
proposals tried with forward passes). Per attack: success rate, queries per image (mean, median; at most
1 + 400 x 101 = 40,401 for DE, k x 129 for greedy), wall time per attacked image, and the model's throughput in
candidate images per second (every candidate of every image in a batch is one forward pass per generation).
"""

from __future__ import annotations

import argparse

import torch

import attacks
from _common import load_trained


def _row(label: str, report, name: str) -> str:
    st = report.per_attack[name]
    per_image = st.seconds / max(st.seen, 1)
    throughput = sum(st.queries) / st.seconds if st.seconds else float("nan")
    return (f"   {label:<22} {st.success_rate:>8.1%} {st.queries_mean:>10,.0f} {st.queries_median:>10,.0f} "
            f"{per_image:>9.3f}s {throughput:>12,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="robustcnn checkpoint (default: the newest run)")
    ap.add_argument("--n", type=int, default=100, help="test images (the attacks see the correctly classified)")
    ap.add_argument("--pixels", default="1,3,5", help="comma-separated k values")
    ap.add_argument("--batch-size", type=int, default=100, help="images per attack call")
    ap.add_argument("--population", type=int, default=400)
    ap.add_argument("--steps", type=int, default=100, help="DE generations")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model, x, y, path = load_trained(args.checkpoint, args.n, args.device)
    ks = [int(k) for k in args.pixels.split(",")]
    print(f"model: {path}  test images: {len(y)}  device: {args.device}  torch threads: {torch.get_num_threads()}")
    print(f"DE settings: population {args.population}, {args.steps} generations, F = 0.5, batch {args.batch_size}")
    print(f"\n   {'attack':<22} {'success':>8} {'queries':>10} {'median q':>10} {'time/img':>10} {'fwd img/s':>12}")
    for k in ks:
        de = attacks.OnePixel(pixels=k, population=args.population, steps=args.steps)
        greedy = attacks.GreedyL0(pixels=k)
        for label, atk in ((f"onepixel k={k} (DE)", de), (f"greedyl0 k={k} (white)", greedy)):
            report = attacks.evaluate(model, (x, y), [atk], batch_size=args.batch_size, device=args.device, seed=0)
            print(_row(label, report, atk.name), flush=True)
    print(f"\n   clean accuracy on these images: {report.clean_accuracy:.2%} "
          f"({int(report.clean_correct.sum())} attacked per row)")


if __name__ == "__main__":
    main()
