"""The same `robustcnn attack` on a robustcnn checkpoint and on that model exported to TorchScript, side by side.

    python benchmarks/bench_loading.py [--checkpoint PATH] [--method pgd] [--n 500] [--repeats 3] [--threads 1]
                                       [--export trace|script]

Loads the checkpoint (default: the newest `robustcnn train` run), exports it with torch.jit.trace (or script) into
a temporary folder, then runs one command line, `robustcnn attack --method M -n N --data DATASET --per-sample
--json`, with `--model CHECKPOINT` and with `--model model.ts`, each in a fresh process as a user would. The two
alternate --repeats times (the order swapped every round, so a machine whose speed drifts hurts both alike) and
each run is printed as it ends. Two times are kept per run: the attack's wall time as the command reports it in
its JSON (`seconds`: the evaluation, without Python start-up and loading) and the whole process's wall time. The
summary gives, for each, the median of the per-round ratios TorchScript / checkpoint and their spread (lowest and
highest round), and says whether every run's per-sample results are identical. --threads sets OMP_NUM_THREADS in
the child processes (one thread is steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import _common  # noqa: F401,I001  (first: puts the repo on sys.path)

from robustcnn.checkpoint import latest_checkpoint  # noqa: E402
from robustcnn.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: The target: the TorchScript model's attack takes at most this many times the checkpoint's.
TARGET = 1.05


def export(checkpoint: Path, folder: Path, how: str) -> tuple[Path, str]:
    """Write the checkpoint's model as TorchScript into ``folder``; return the file and the checkpoint's dataset."""
    model, meta = load_model(checkpoint)
    example = torch.rand(2, *meta["input_shape"])
    with warnings.catch_warnings(), torch.no_grad():  # torch.jit announces its own deprecation on every call
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.trace(model, example) if how == "trace" else torch.jit.script(model)
        path = folder / "model.ts"
        scripted.save(str(path))
    return path, meta["dataset"]


def attack(model: Path, args: argparse.Namespace, dataset: str) -> dict:
    """One `robustcnn attack` in a fresh process: its JSON document, with the process's wall time added."""
    command = [sys.executable, "-m", "cli", "attack", "--method", args.method, "-n", str(args.n), "--model",
               str(model), "--data", dataset, "--device", "cpu", "--seed", "0", "--per-sample", "--json"]
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"robustcnn attack --model {model} failed: {done.stderr.strip().splitlines()[-1:]}")
    doc = json.loads(done.stdout)
    doc["process_seconds"] = wall
    return doc


def results(doc: dict) -> list:
    """The outcome of a run without its times: per budget, the accuracies and every per-sample result."""
    return [{k: row[k] for k in ("eps", "n", "clean_accuracy", "robust_accuracy", "per_sample")}
            for row in doc["results"]]


def _ratios(runs: dict[str, list[dict]], key) -> list[float]:
    return [key(ts) / key(ck) for ck, ts in zip(runs["checkpoint"], runs["torchscript"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--method", default="pgd")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export", choices=("trace", "script"), default="trace")
    args = ap.parse_args()
    if args.repeats < 1 or args.n < 1 or args.threads < 1:
        raise SystemExit("--repeats, --n and --threads must be >= 1")
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        script, dataset = export(checkpoint, Path(tmp), args.export)
        print(f"model: {checkpoint} (and torch.jit.{args.export} of it)  data: {dataset}  attack: {args.method}  "
              f"-n {args.n}  threads: {args.threads}  repeats: {args.repeats}\n")
        print(f"{'round':>5} {'model':<12} {'attack (s)':>10} {'process (s)':>11} {'robust':>7}")
        models = {"checkpoint": checkpoint, "torchscript": script}
        runs: dict[str, list[dict]] = {"checkpoint": [], "torchscript": []}
        for r in range(args.repeats):
            for name in (("checkpoint", "torchscript") if r % 2 == 0 else ("torchscript", "checkpoint")):
                doc = attack(models[name], args, dataset)
                runs[name].append(doc)
                seconds = sum(row["seconds"] for row in doc["results"])
                print(f"{r + 1:>5} {name:<12} {seconds:>10.2f} {doc['process_seconds']:>11.2f} "
                      f"{doc['results'][0]['robust_accuracy']:>7.2%}", flush=True)
    attack_ratios = _ratios(runs, lambda d: sum(row["seconds"] for row in d["results"]))
    process_ratios = _ratios(runs, lambda d: d["process_seconds"])
    print(f"\n{'TorchScript / checkpoint':<26} {'median':>7} {'lowest':>7} {'highest':>8}")
    for label, ratios in (("attack time (JSON)", attack_ratios), ("process time", process_ratios)):
        print(f"{label:<26} {statistics.median(ratios):>7.3f} {min(ratios):>7.3f} {max(ratios):>8.3f}")
    reference = results(runs["checkpoint"][0])
    same = all(results(doc) == reference for docs in runs.values() for doc in docs)
    median = statistics.median(attack_ratios)
    print(f"\nper-sample results identical in all {2 * args.repeats} runs: {'yes' if same else 'NO'}; "
          f"attack-time ratio {median:.3f} {'within' if median <= TARGET else 'OVER'} the {TARGET:.2f} target")


if __name__ == "__main__":
    main()
