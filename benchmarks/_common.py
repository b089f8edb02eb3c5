"""Helpers shared by the benchmarks: load a trained model and its test set, time a callable robustly."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def load_trained(checkpoint: Optional[str], n: int, device: str = "cpu"):
    """(model, x_test[:n] float in [0,1], y_test[:n], checkpoint path); newest `robustcnn train` run by default."""
    from robustcnn.checkpoint import latest_checkpoint, load_model
    from robustcnn.data import load_dataset

    path = Path(checkpoint) if checkpoint else latest_checkpoint()
    model, meta = load_model(path, device=device)
    data = load_dataset(meta["dataset"], train=False)
    x = data.images[:n].float().div(255).to(device)
    y = data.labels[:n].to(device)
    return model.eval(), x, y, path


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``repeats`` runs after one warm-up (robust to a noisy machine)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
