"""Fault injection: training, reports and patch training killed at random points (SIGKILL, SIGTERM), a full disk,
two writers on one output at once. Every case checks that

- nothing already written is lost or corrupted: every file that was there before is byte-identical afterwards, or,
  if it is an output the command itself updates (a checkpoint, a report's resume state), still ours and loadable;
  every file the faulty run left is ours and loadable;
- the process ended as it should, with a one-line message naming the cause where one is printed;
- a rerun (``--resume`` for training) finishes with exactly the uninterrupted run's result: the same checkpoint
  weights, the same per-sample report results, the same patch.

    python benchmarks/bench_faults.py [--seed 0] [--kills 3]

prints one row per case and the counts: cases tried, handled cleanly, data lost (the target is 0).
``tests/test_faults.py`` runs a fast subset of these cases.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from robustcnn.checkpoint import read_checkpoint  # noqa: E402
from robustcnn.fsutil import is_ours, lock_file  # noqa: E402

TRAIN = ("train", "--dataset", "shapes", "--model", "lenet5", "--limit", "128", "--epochs", "2", "--batch-size", "32",
         "--device", "cpu", "--seed", "0", "--json")
CHECKPOINT = "shapes-lenet5.pt"
#: A file of the user's in every output folder: it must come through every fault untouched.
USER_FILE = "notes.txt"


@dataclass
class Outcome:
    """What one case found: ``lost`` lists data lost or corrupted, ``problems`` anything else not handled cleanly."""

    case: str
    returncode: Optional[int] = None
    message: str = ""
    lost: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.lost and not self.problems


class Workspace:
    """A scratch folder with its own ``ROBUSTCNN_HOME``, in which ``python -m cli`` runs as separate processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "ROBUSTCNN_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache"),
                    "PYTHONPATH": str(REPO)}
        self.env.pop("ROBUSTCNN_DEBUG", None)

    def start(self, *args: str, fsize: Optional[int] = None) -> subprocess.Popen:
        """Start ``robustcnn ARGS``; with ``fsize`` no file it writes may grow beyond that many bytes (a full disk:
        writes fail with EFBIG, SIGXFSZ ignored)."""
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=self.root, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=limit if fsize is not None else None)

    def run(self, *args: str, fsize: Optional[int] = None) -> subprocess.CompletedProcess:
        proc = self.start(*args, fsize=fsize)
        out, err = proc.communicate(timeout=900)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def folder(self, name: str) -> Path:
        """A new output folder holding the user's own file."""
        path = self.root / name
        path.mkdir(parents=True)
        (path / USER_FILE).write_text("the user's own notes\n")
        return path


# -- what a run leaves ---------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    """Every visible file under ``folder`` (lock and temporary files start with a dot) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def check_kept(before: dict[str, bytes], folder: Path, outputs: set[str]) -> list[str]:
    """What the fault lost or corrupted: a file of ``before`` missing or changed (``outputs``, the files the command
    writes, may change but must stay ours and loadable), or a new file that is not ours and loadable."""
    lost = []
    for name, data in before.items():
        path = folder / name
        if not path.is_file():
            lost.append(f"{name} is gone")
        elif path.read_bytes() != data and not (name in outputs and is_ours(path)):
            lost.append(f"{name} was changed")
    for name in snapshot(folder).keys() - before.keys():
        if not is_ours(folder / name):
            lost.append(f"{name} was left damaged")
    return lost


def one_line(stderr: str, *expected: str) -> Optional[str]:
    """None if ``stderr`` is one ``error:`` line containing one of ``expected``; else what is wrong with it."""
    lines = stderr.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"not a one-line error: {stderr.strip()[-300:]!r}"
    if expected and not any(e.lower() in lines[0].lower() for e in expected):
        return f"the message does not name the cause ({' or '.join(expected)}): {lines[0]!r}"
    return None


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> bool:
    """Wait until ``path`` exists (True) or ``proc`` ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return path.exists()
        time.sleep(0.02)
    return False


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def per_sample(doc: dict) -> list:
    return [(r["eps"], r["robust_accuracy"], r["per_sample"]) for r in doc["results"]]


# -- the three writers ---------------------------------------------------------------------------------------------
@dataclass
class Writer:
    """One command that writes outputs: how to run it into a folder, which files it writes, its lock file, how to
    rerun it after a fault, and whether its result equals the reference's."""

    name: str
    args: Callable[[Path], tuple[str, ...]]
    outputs: Callable[[Path], set[str]]
    lock: Callable[[Path], Path]
    rerun_args: Callable[[Path], tuple[str, ...]]
    same: Callable[[Path, subprocess.CompletedProcess, Path], bool]
    cause: tuple[str, ...] = ()


def training(ws: Workspace) -> Writer:
    return Writer(
        "train", args=lambda out: (*TRAIN, "--out", str(out)), outputs=lambda out: {CHECKPOINT},
        lock=lambda out: lock_file(out / CHECKPOINT),
        rerun_args=lambda out: (*TRAIN, "--out", str(out)) + (("--resume",) if (out / CHECKPOINT).exists() else ()),
        same=lambda out, done, ref: same_weights(out / CHECKPOINT, ref / CHECKPOINT))


def reporting(ws: Workspace, checkpoint: Path) -> Writer:
    args = ("report", "--checkpoint", str(checkpoint), "--attacks", "fgsm,pgd", "--eps", "0.03,0.1", "--n", "32",
            "--device", "cpu", "--json")
    files = {"report.json", "report.md", "report.html", "accuracy_vs_eps.png", "gallery.png", "state.pt"}

    def same(out: Path, done: subprocess.CompletedProcess, ref: Path) -> bool:
        mine = json.loads((out / "rep" / "report.json").read_text())
        theirs = json.loads((ref / "rep" / "report.json").read_text())
        return per_sample(mine) == per_sample(theirs)

    return Writer("report", args=lambda out: (*args, "--out", str(out / "rep")),
                  outputs=lambda out: {f"rep/{f}" for f in files}, lock=lambda out: lock_file(out / "rep"),
                  rerun_args=lambda out: (*args, "--out", str(out / "rep")), same=same)


def patching(ws: Workspace, checkpoint: Path) -> Writer:
    args = ("patch", "train", "--checkpoint", str(checkpoint), "--area", "0.05", "--steps", "10", "--refine", "0",
            "--no-sink", "--shape", "square", "--train-images", "64", "--n", "32", "--draws", "1", "--batch-size",
            "32", "--device", "cpu", "--json")

    def same(out: Path, done: subprocess.CompletedProcess, ref: Path) -> bool:
        return torch.equal(torch.load(out / "patch.pt"), torch.load(ref / "patch.pt"))

    return Writer("patch", args=lambda out: (*args, "--out", str(out / "patch")),
                  outputs=lambda out: {"patch.png", "patch.pt"}, lock=lambda out: lock_file(out / "patch.png"),
                  rerun_args=lambda out: (*args, "--out", str(out / "patch")), same=same)


# -- the faults ----------------------------------------------------------------------------------------------------
def rerun(ws: Workspace, writer: Writer, out: Path, ref: Path, outcome: Outcome) -> None:
    """Run the command again without a fault: it must finish with the reference's result."""
    done = ws.run(*writer.rerun_args(out))
    if done.returncode != 0:
        outcome.problems.append(f"the rerun failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    elif not writer.same(out, done, ref):
        outcome.problems.append("the rerun's result differs from the uninterrupted run's")


def kill(ws: Workspace, writer: Writer, ref: Path, sig: signal.Signals, delay: float, tag: str,
         earlier: Optional[Path] = None) -> Outcome:
    """Start ``writer``, wait until it holds its output, ``delay`` seconds more, then send ``sig``; ``earlier``: a
    folder whose outputs are copied in first (a finished earlier result the faulty run must not lose)."""
    outcome = Outcome(f"{writer.name}: {sig.name} after {delay:.2f} s")
    out = ws.folder(f"{writer.name}-{tag}")
    if earlier is not None:
        for name in writer.outputs(out):
            if (earlier / name).exists():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(earlier / name, out / name)
    before = snapshot(out)
    proc = ws.start(*writer.args(out))
    wait_for(writer.lock(out), proc)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=900)
    outcome.returncode = proc.returncode
    if proc.returncode not in (0, -sig, 130):
        outcome.problems.append(f"exit {proc.returncode}: {err.strip()[-300:]}")
    if proc.returncode == 130 and (problem := one_line(err, "interrupted")):
        outcome.problems.append(problem)
    outcome.message = err.strip()[-200:]
    outcome.lost += check_kept(before, out, writer.outputs(out))
    if proc.returncode == 0:
        # the signal came after the run finished (a finished report folder is never redone): its result is compared
        # as it stands
        if not writer.same(out, subprocess.CompletedProcess(proc.args, 0), ref):
            outcome.problems.append("the finished run's result differs from the uninterrupted run's")
        return outcome
    rerun(ws, writer, out, ref, outcome)
    return outcome


#: Words of which a message about a failed write must name one.
DISK_FULL = ("too large", "no space", "disk", "full")


def disk_full(ws: Workspace, writer: Writer, ref: Path, fsize: int, tag: str, earlier: Optional[Path],
              cause: tuple[str, ...] = DISK_FULL) -> Outcome:
    """Run ``writer`` with no file allowed beyond ``fsize`` bytes over a copy of ``earlier``'s outputs; its message
    must name one of ``cause`` (none: any one line will do)."""
    outcome = Outcome(f"{writer.name}: files limited to {fsize} bytes")
    out = ws.folder(f"{writer.name}-{tag}")
    for name in writer.outputs(out):
        if earlier is not None and (earlier / name).exists():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(earlier / name, out / name)
    before = snapshot(out)
    done = ws.run(*writer.args(out), fsize=fsize)
    outcome.returncode, outcome.message = done.returncode, done.stderr.strip()[-200:]
    if done.returncode != 1:
        outcome.problems.append(f"exit {done.returncode}, not 1")
    if problem := one_line(done.stderr, *cause):
        outcome.problems.append(problem)
    outcome.lost += check_kept(before, out, set())  # a failed write leaves every earlier file exactly as it was
    rerun(ws, writer, out, ref, outcome)
    return outcome


def two_writers(ws: Workspace, writer: Writer, out: Path, then: str = "continue") -> Outcome:
    """Start ``writer`` into ``out`` and stop it (SIGSTOP) once it holds its output; a second one into the same
    output must fail at once with one line naming the first's process. ``then``: ``continue`` the first (it must
    finish; the caller compares its result) or ``kill`` it (SIGKILL, leaving its lock file behind) and rerun the
    second, which must not be blocked by the stale lock file."""
    ending = "finishes" if then == "continue" else "is killed"
    outcome = Outcome(f"{writer.name}: two writers at once, then the first {ending}")
    before = snapshot(out)
    first = ws.start(*writer.args(out))
    if not wait_for(writer.lock(out), first):
        first.communicate()
        outcome.problems.append("the first writer ended before it held its output")
        return outcome
    first.send_signal(signal.SIGSTOP)
    try:
        second = ws.run(*writer.args(out))
    finally:
        first.send_signal(signal.SIGKILL if then == "kill" else signal.SIGCONT)
    outcome.returncode, outcome.message = second.returncode, second.stderr.strip()[-200:]
    if second.returncode != 1:
        outcome.problems.append(f"the second writer exited {second.returncode}, not 1")
    if problem := one_line(second.stderr, "another robustcnn run is writing"):
        outcome.problems.append(problem)
    elif f"pid {first.pid}" not in second.stderr:
        outcome.problems.append(f"the message does not name the first writer's pid {first.pid}")
    _, err = first.communicate(timeout=900)
    if then == "continue" and first.returncode != 0:
        outcome.problems.append(f"the first writer failed ({first.returncode}): {err.strip()[-300:]}")
    if then == "kill":
        if not writer.lock(out).exists():
            outcome.problems.append("the killed writer left no lock file (the stale-lock case was not exercised)")
        outcome.lost += check_kept(before, out, writer.outputs(out))
    return outcome


# -- the whole set -------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    parser.add_argument("--kills", type=int, default=3, help="kills per writer and signal")
    opts = parser.parse_args(argv)
    rng = random.Random(opts.seed)
    outcomes: list[Outcome] = []

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        print(f"{'ok  ' if outcome.clean else 'FAIL'} {outcome.case}: exit {outcome.returncode}"
              + "".join(f"\n       lost: {x}" for x in outcome.lost)
              + "".join(f"\n       problem: {x}" for x in outcome.problems), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        ws = Workspace(Path(tmp))
        ref = ws.folder("reference")
        train = training(ws)
        record(two_writers(ws, train, ref))  # the first writer's run is the reference run
        report, patch = reporting(ws, ref / CHECKPOINT), patching(ws, ref / CHECKPOINT)
        record(two_writers(ws, report, ref))
        record(two_writers(ws, patch, ref))
        for writer in (train, report, patch):
            record(two_writers(ws, writer, ws.folder(f"{writer.name}-stale"), then="kill"))
            rerun_outcome = Outcome(f"{writer.name}: a rerun over a killed writer's stale lock file")
            rerun(ws, writer, ws.root / f"{writer.name}-stale", ref, rerun_outcome)
            record(rerun_outcome)
        spans = {"train": 8.0, "report": 6.0, "patch": 6.0}
        for writer in (train, report, patch):
            for sig in (signal.SIGKILL, signal.SIGTERM):
                for k in range(opts.kills):
                    delay = rng.uniform(0, spans[writer.name])
                    earlier = ref if k == 0 and writer is not report else None  # a finished report is never redone
                    record(kill(ws, writer, ref, sig, delay, f"{sig.name}-{k}", earlier=earlier))
        for writer, fsize in ((train, 1 << 16), (report, 4096), (patch, 256)):
            record(disk_full(ws, writer, ref, fsize, "full", earlier=None if writer is report else ref))

    lost = sum(bool(o.lost) for o in outcomes)
    clean = sum(o.clean for o in outcomes)
    print(f"\n{'case':<72} {'exit':>5}  result")
    for o in outcomes:
        print(f"{o.case:<72} {str(o.returncode):>5}  {'clean' if o.clean else 'LOST' if o.lost else 'not clean'}")
    print(f"\ncases tried: {len(outcomes)}, handled cleanly: {clean}, data lost: {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
