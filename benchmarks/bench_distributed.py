"""Evaluation throughput on 1 and on N processes (torch.distributed, gloo on the CPU), side by side.

    python benchmarks/bench_distributed.py [--checkpoint PATH] [--n 500] [--processes 2] [--attack pgd]
                                           [--eps 0.03] [--steps 20] [--batch-size 250] [--rounds 2]

Runs the same robust-accuracy evaluation (one attack, as `robustcnn attack` does) once in one process and once
sharded over N processes started with torch.multiprocessing, each process using cores // N threads, and prints
wall time (the fastest of --rounds, the two set-ups alternating so a busy machine hurts both alike), images per
second, speed-up and scaling efficiency (speed-up / N). It also checks that the per-sample
outcomes of both runs are identical. The model is the newest `robustcnn train` run unless --checkpoint is given.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

from _common import load_trained  # noqa: I001  (first: puts the repo on sys.path)

import attacks  # noqa: E402
from robustcnn.distributed import setup, teardown, threads_per_process  # noqa: E402


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx, dev = setup("cpu")  # gloo and cores // world threads when world > 1; nothing when world == 1
    if world == 1:
        torch.set_num_threads(threads_per_process(1))
    try:
        model, x, y, _ = load_trained(args.checkpoint, args.n)
        atk = attacks.get(args.attack).build(eps=args.eps, **({"steps": args.steps} if args.steps else {}))
        ctx.barrier()
        t0 = time.perf_counter()
        rep = attacks.evaluate(model, (x, y), [atk], batch_size=args.batch_size, seed=0, shard=ctx.shard)
        ctx.barrier()
        wall = time.perf_counter() - t0
        if ctx.is_main:
            torch.save({"wall": wall, "robust": rep.robust, "fooled_by": rep.fooled_by, "queries": rep.queries,
                        "threads": torch.get_num_threads(), "clean": rep.clean_accuracy,
                        "robust_accuracy": rep.robust_accuracy}, out)
        teardown(ctx, ok=True)
    except BaseException:
        teardown(ctx, ok=False)
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace, folder: str) -> dict:
    out = os.path.join(folder, f"world{world}.pt")
    mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
    return torch.load(out, weights_only=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--attack", default="pgd")
    ap.add_argument("--eps", type=float, default=0.03)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    _, x, _, path = load_trained(args.checkpoint, args.n)  # fail early, in one line, without a model
    args.checkpoint = str(path)
    print(f"model: {path}  samples: {x.shape[0]}  attack: {args.attack} eps={args.eps} steps={args.steps}  "
          f"batch {args.batch_size}  cores: {threads_per_process(1)}\n")
    with tempfile.TemporaryDirectory() as folder:
        results: dict = {}
        for _ in range(max(1, args.rounds)):
            for w in (1, args.processes):
                r = run(w, args, folder)
                if w not in results or r["wall"] < results[w]["wall"]:
                    results[w] = r
    base = results[1]["wall"]
    print(f"{'processes':>9} {'threads/proc':>12} {'wall (s)':>9} {'img/s':>8} {'speed-up':>9} {'efficiency':>10}")
    for w, r in results.items():
        speed = base / r["wall"]
        print(f"{w:>9} {r['threads']:>12} {r['wall']:>9.2f} {x.shape[0] / r['wall']:>8.1f} {speed:>9.2f} "
              f"{speed / w:>10.0%}")
    one, many = results[1], results[args.processes]
    same = all(torch.equal(one[k], many[k]) for k in ("robust", "fooled_by", "queries"))
    print(f"\nclean {one['clean']:.2%}, robust {one['robust_accuracy']:.2%} (1 process) vs "
          f"{many['robust_accuracy']:.2%} ({args.processes}); per-sample outcomes identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
