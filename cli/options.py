"""Option types shared by every command, so ``--device``, ``--seed``, ``--batch-size`` and ``--json`` behave alike."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Annotated, Optional

import typer

from attacks.base import MAX_BATCH, MAX_ITERATIONS
from attacks.norms import get_norm
from robustcnn.errors import UsageError

COMMON = "Common options"

Device = Annotated[
    str,
    typer.Option("--device", help="Where to run: auto (CUDA if present, else CPU), cpu or cuda.", rich_help_panel=COMMON),
]
Seed = Annotated[
    int, typer.Option("--seed", help="Seed for every random choice; same seed + same device = same result.", rich_help_panel=COMMON)
]
BatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size",
        help="Images per batch. Default: measured per device (CPU 128 train / 250 eval, GPU 512 / 1024).",
        rich_help_panel=COMMON,
    ),
]
Json = Annotated[
    bool, typer.Option("--json", help="Print exactly one JSON document on stdout and nothing else.", rich_help_panel=COMMON)
]
DataDir = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        help="Folder holding the dataset files (also $ROBUSTCNN_DATA). Default: search cache, Debian path, download.",
        rich_help_panel=COMMON,
    ),
]
Checkpoint = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Model checkpoint (.pt). Default: the newest run of `robustcnn train`."),
]


def parse_eps(text: str, norm: str = "linf") -> float:
    """Parse one budget of ``norm``: a decimal (``0.005``) or a fraction (``8/255``), in pixel units of [0, 1] images.

    The bounds are the norm's (:meth:`attacks.norms.Norm.check_budget`): [0, 1] under Linf, >= 0 under L2 (the
    image's diameter, unknown here, is checked when the attack runs).
    """
    raw = text.strip()
    try:
        value = float(Fraction(raw)) if "/" in raw else float(raw)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"invalid eps {text!r}: write a number such as 0.03 or a fraction such as 8/255") from None
    if not value == value or value in (float("inf"), float("-inf")):
        raise UsageError(f"invalid eps {text!r}: must be a finite number")
    try:
        get_norm(norm).check_budget(value)
    except ValueError as exc:
        raise UsageError(f"invalid eps {text!r}: {exc}") from None
    return value


def parse_eps_list(text: str, norm: str = "linf") -> list[float]:
    """Parse ``0.01,0.02,8/255`` into a list of budgets of ``norm`` (at least one)."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise UsageError(f"invalid eps list {text!r}: give at least one value, e.g. 0.01,0.02,8/255")
    return [parse_eps(p, norm) for p in parts]


#: Upper bounds of the count options, far above any useful setting and low enough that a slip (``2**63``) is refused
#: at once instead of running for ever (the attack fields' own counts are bounded by :func:`attacks.base.check_int`).
COUNT_LIMITS = {"--epochs": 10_000, "--steps": MAX_ITERATIONS, "--draws": 1_000, "--batch-size": MAX_BATCH,
                "--n": 10_000_000, "--limit": 10_000_000, "--train-images": 10_000_000}


def positive(name: str, value: float | int | None) -> None:
    """Refuse a non-positive number for option ``name`` (None means 'use the default'), and a count above its
    bound in :data:`COUNT_LIMITS`."""
    if value is not None and not value > 0:
        raise UsageError(f"{name} must be > 0, got {value}")
    high = COUNT_LIMITS.get(name)
    if value is not None and high is not None and value > high:
        raise UsageError(f"{name} must be <= {high:,} (a bound far above any useful setting, so that the run ends), "
                         f"got {value}")
