"""White-box attack strength on a trained model.

    python benchmarks/bench_strength.py [--checkpoint PATH] [--n 1000]

Prints accuracy under attack for: FGSM/PGD over eps, PGD over steps, PGD with and without restarts, APGD-CE,
APGD-T (DLR) and PGD at the same budget, and the minimum-norm attacks' median norms.
"""

from __future__ import annotations

import argparse
import time

from _common import load_trained  # noqa: I001  (first: puts the repo on sys.path)

import attacks  # noqa: E402


def acc(model, x, y, atk, seed=0):
    t0 = time.perf_counter()
    rep = attacks.evaluate(model, (x, y), [atk], batch_size=250, seed=seed)
    return rep, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    model, x, y, path = load_trained(args.checkpoint, args.n)
    clean = attacks.evaluate(model, (x, y), []).clean_accuracy
    print(f"model: {path}  samples: {len(y)}  clean accuracy {clean:.2%}\n")

    def row(label, atk):
        rep, t = acc(model, x, y, atk)
        print(f"  {label:<34} {rep.robust_accuracy:7.2%}   ({t:5.1f}s)")
        return rep.robust_accuracy

    print("accuracy vs eps (Linf)")
    for name in ("fgsm", "pgd"):
        vals = [row(f"{name} eps={e}", attacks.build(name, eps=e) if name == "fgsm" else attacks.PGD(eps=e, steps=20))
                for e in (0.01, 0.02, 0.05, 0.1, 0.2)]
        print(f"  -> non-increasing in eps: {all(a >= b for a, b in zip(vals, vals[1:]))}")
    print("accuracy vs steps (PGD, eps=0.05)")
    vals = [row(f"pgd steps={k}", attacks.PGD(eps=0.05, steps=k)) for k in (1, 5, 10, 20, 50)]
    print(f"  -> non-increasing in steps: {all(a >= b for a, b in zip(vals, vals[1:]))}")
    print("restarts and APGD at eps=0.05")
    p1 = row("pgd-20 restarts=1", attacks.PGD(eps=0.05, steps=20))
    p5 = row("pgd-20 restarts=5", attacks.PGD(eps=0.05, steps=20, restarts=5))
    ap_ce = row("apgd-ce 100 steps", attacks.APGD(eps=0.05))
    ap_t = row("apgd-t (dlr, 9 targets)", attacks.APGDT(eps=0.05))
    print(f"  -> restarts <= no restarts: {p5 <= p1};  APGD-CE <= PGD-20: {ap_ce <= p1};  APGD-T <= PGD-20: {ap_t <= p1}")
    print("headline: PGD-20 at eps=0.1")
    p = row("pgd-20 eps=0.1", attacks.PGD(eps=0.1, steps=20))
    print(f"  -> below 10 %: {p < 0.10}")
    print("minimum-norm attacks (median L2 of successful perturbations)")
    for label, atk in (("deepfool l2", attacks.DeepFool()), ("cw l2 (100 steps x 5 searches)",
                                                             attacks.CarliniWagner(steps=100, binary_steps=5))):
        rep, t = acc(model, x[:200], y[:200], atk)
        st = next(iter(rep.per_attack.values()))
        print(f"  {label:<34} success {st.success_rate:6.2%}  median L2 {st.median_norm:.3f}  ({t:5.1f}s)")


if __name__ == "__main__":
    main()
