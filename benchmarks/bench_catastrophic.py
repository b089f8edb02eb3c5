"""Catastrophic overfitting, and whether the report catches it.

    python benchmarks/bench_catastrophic.py [--eps 0.2] [--epochs 5] [--n 1000] [--out DIR [--resume]]

Trains the `simple` CNN on Fashion-MNIST with plain single-step FGSM adversarial training (no random start,
step = eps: the recipe known to overfit catastrophically), then prints clean accuracy, accuracy under FGSM and
PGD-20, and runs the report's standard suite with its sanity checks on the same test images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import _common  # noqa: F401  (puts the repo on sys.path)
import attacks  # noqa: E402
from robustcnn.adversarial import attack_batches
from robustcnn.data import load_dataset
from robustcnn.report import ReportRequest, file_sha256, run_report
from robustcnn.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--model", default="simple")
    ap.add_argument("--suite", default=attacks.DEFAULT_SUITE)
    ap.add_argument("--out", default=None, help="folder for the checkpoint and the report (default: a temp dir)")
    ap.add_argument("--resume", action="store_true",
                    help="continue (or reuse, when complete) the FGSM-AT checkpoint already in --out")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="catastrophic-"))
    out.mkdir(parents=True, exist_ok=True)
    train_data, test_data = load_dataset("fashion-mnist", train=True), load_dataset("fashion-mnist", train=False)
    config = TrainConfig(model=args.model, epochs=args.epochs, seed=0)
    fgsm_train = attacks.FGSM(eps=args.eps, early_stop=False)
    t0 = time.perf_counter()
    result = train(config, train_data, test_data, checkpoint=out / "fgsm-at.pt",
                   make_batch=attack_batches(fgsm_train, seed=0), resume=args.resume and (out / "fgsm-at.pt").exists())
    print(f"trained {args.model} with FGSM-AT at eps={args.eps} for {args.epochs} epochs in "
          f"{time.perf_counter() - t0:.0f}s -> {out / 'fgsm-at.pt'}")
    model = result.model.eval()
    x, y = test_data.images[: args.n].float() / 255, test_data.labels[: args.n]
    for label, atk in (("FGSM", attacks.FGSM(eps=args.eps)), ("PGD-20", attacks.PGD(eps=args.eps, steps=20))):
        rep = attacks.evaluate(model, (x, y), [atk], seed=0)
        print(f"  clean {rep.clean_accuracy:.2%}   under {label:<6} {rep.robust_accuracy:.2%}")
    req = ReportRequest(suite=args.suite, attacks=None, eps=[args.eps], norm="linf", n=len(y), seed=0,
                        checkpoint_sha256=file_sha256(out / "fgsm-at.pt"), dataset="fashion-mnist")
    t0 = time.perf_counter()
    doc, _ = run_report(model, x, y, req, out / "report", device=torch.device("cpu"), batch_size=250)
    (r,) = doc["results"]
    print(f"report ({args.suite} suite, {time.perf_counter() - t0:.0f}s): clean {doc['clean_accuracy']:.2%}  "
          f"worst-case robust {r['robust_accuracy']:.2%}")
    for st, after in zip(r["attacks"], r["accuracy_after"]):
        if st.get("skipped"):
            print(f"  {st['name']:<10} skipped: the attack before it fooled none")
            continue
        print(f"  {st['name']:<10} success {st['success_rate']:.1%} on {st['seen']} seen -> accuracy {after:.2%}")
    print("sanity warnings:")
    for w in doc["warnings"] or ["(none)"]:
        print(f"  - {w}")


if __name__ == "__main__":
    main()
