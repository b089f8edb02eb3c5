"""An attack is one file: dropped into ``attacks/``, it is listed, runnable from the CLI with its parameters, and
covered by the contract tests, with no other edit (checked in a copy of the project)."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from train_fixtures import isolated  # noqa: F401  (fixture used by `newest`)

ROOT = Path(__file__).resolve().parent.parent

ATTACK_FILE = '''"""RandStep: one gradient-sign step of size eps from a random point near x (a test attack)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import BoundedAttack, check_range
from attacks.losses import get_loss
from attacks.params import param
from attacks.registry import register


@register
@dataclass(frozen=True, kw_only=True)
class RandStep(BoundedAttack):
    name = "randstep"
    targeted_ok = False
    description = "One gradient-sign step of size eps from a uniform random start"

    spread: float = param(0.5, "Half-width of the random start, a fraction of eps.", fast=0.25)

    def _validate(self) -> None:
        super()._validate()
        check_range("spread", self.spread, low=0.0, high=1.0, low_inclusive=True)

    def _run(self, ctx):
        idx = torch.arange(ctx.n, device=ctx.x.device)
        noise = 2 * ctx.rng.uniform(idx, tuple(ctx.x.shape[1:])).to(ctx.x) - 1
        start = (ctx.x + self.spread * self.eps * noise).clamp(0.0, 1.0)
        _, _, grad = ctx.value_and_grad(start, idx, get_loss("ce"))
        return start + self.eps * grad.sign(), None
'''


def _copy_project(dest: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__", ".pytest_cache")
    for folder in ("attacks", "robustcnn", "cli", "tests"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=skip)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _run(copy: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    return done


def test_a_new_attack_file_is_listed_run_and_contract_tested(newest, tmp_path):
    copy = tmp_path / "project"
    _copy_project(copy)
    (copy / "attacks" / "randstep.py").write_text(ATTACK_FILE)
    diff = filecmp.dircmp(ROOT / "attacks", copy / "attacks", ignore=["__pycache__"])
    assert diff.right_only == ["randstep.py"] and not diff.diff_files and not diff.left_only
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}

    listed = json.loads(_run(copy, "-m", "cli", "attacks", "--json", env=env).stdout)
    (entry,) = [e for e in listed if e["name"] == "randstep"]
    assert entry["params"]["spread"]["default"] == 0.5 and "fraction of eps" in entry["params"]["spread"]["help"]

    ran = json.loads(_run(copy, "-m", "cli", "attack", "--method", "randstep", "--eps", "0.2", "--param",
                          "spread=0.1", "--n", "16", "--json", env=env).stdout)
    stats = ran["results"][0]["attacks"]["randstep"]
    assert stats["config"]["spread"] == 0.1 and stats["max_norm"] <= 0.2 + 1e-6 and stats["gradients_mean"] == 1

    tested = _run(copy, "-m", "pytest", "-q", "tests/test_attack_contract.py", "-k", "randstep", env=env).stdout
    passed = re.search(r"(\d+) passed", tested)
    assert passed and int(passed.group(1)) >= 5 and "failed" not in tested, tested
