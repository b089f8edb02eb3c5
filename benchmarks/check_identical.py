"""Per-sample results of a fixed set of seeded runs, to show that a change to the code kept them bit for bit.

    python benchmarks/check_identical.py run CHECKPOINT OUT_DIR     # one JSON file per run, timings stripped
    python benchmarks/check_identical.py compare DIR_A DIR_B        # exit 1 and name the runs that differ

The runs: ``robustcnn attack --per-sample --json`` with PGD, APGD, Square, HopSkipJump, one-pixel and LaVAN, and a
``robustcnn report --suite standard``, each on fixed seeds and the first test images of the checkpoint's dataset.
Wall times and paths are removed from the documents before they are written, so only results remain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "pgd": ["attack", "-m", "pgd", "--eps", "0.1", "-n", "300"],
    "apgd": ["attack", "-m", "apgd", "--eps", "0.1", "-n", "200"],
    "square": ["attack", "-m", "square", "--eps", "0.1", "--queries", "300", "-n", "200"],
    "hopskipjump": ["attack", "-m", "hopskipjump", "--queries", "400", "-n", "40"],
    "onepixel": ["attack", "-m", "onepixel", "--pixels", "1", "-n", "40"],
    "lavan": ["attack", "-m", "lavan", "--area", "0.05", "-n", "40"],
}
REPORT = ["report", "--suite", "standard", "--eps", "0.05,0.1", "-n", "100"]

#: Keys whose values are wall times, paths or versions: not results.
NOISE = {"seconds", "time", "checkpoint", "versions", "out", "folder", "files", "started", "finished", "path"}


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in NOISE and not k.endswith("_seconds") and not k.startswith("seconds")}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def _robustcnn(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "cli", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"robustcnn {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def run(checkpoint: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, args in RUNS.items():
        doc = _robustcnn([*args, "--per-sample", "--seed", "3", "-c", checkpoint])
        (out / f"{name}.json").write_text(json.dumps(_strip(doc), indent=1, sort_keys=True))
        print(f"{name}: written")
    with tempfile.TemporaryDirectory() as tmp:
        doc = _robustcnn([*REPORT, "--seed", "3", "-c", checkpoint, "--out", str(Path(tmp) / "rep")])
        per_sample = json.loads((Path(tmp) / "rep" / "report.json").read_text())
    (out / "report.json").write_text(json.dumps(_strip({"stdout": doc, "file": per_sample}), indent=1,
                                                sort_keys=True))
    print("report: written")


def compare(a: Path, b: Path) -> int:
    names = sorted({p.name for p in a.glob("*.json")} | {p.name for p in b.glob("*.json")})
    bad = [n for n in names if not (a / n).exists() or not (b / n).exists()
           or _strip(json.loads((a / n).read_text())) != _strip(json.loads((b / n).read_text()))]
    for n in names:
        print(f"{n:18s} {'DIFFERENT' if n in bad else 'identical'}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        run(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit(__doc__)
