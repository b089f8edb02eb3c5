"""Helpers shared by the benchmarks: load a trained model and its test set, clocks, time a callable robustly, time
what runs inside a model."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

# Run from a checkout without installing: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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


#: The benchmarks' timers: wall time, or this process's CPU time (steadier on a busy machine; with one thread it is
#: the work done).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class _Mark(torch.autograd.Function):
    """Identity that, in the backward pass, reads the clock: at the model's output (the backward pass enters the
    model) or at its input (the backward pass has left it)."""

    @staticmethod
    def forward(ctx, x, timed, entering):
        ctx.timed, ctx.entering = timed, entering
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        timed = ctx.timed
        if ctx.entering:
            timed._entered = timed.clock()
        elif timed._entered is not None:
            timed.seconds += timed.clock() - timed._entered
            timed._entered = None
        return grad, None, None


class TimedModel(nn.Module):
    """The wrapped model, adding up the time spent inside it — its forward passes, and its backward passes to the
    input — and recording each forward call's batch size. A caller's time over ``seconds`` is its own work outside
    the model, measured in the same run, so a machine whose speed drifts between runs cannot move it."""

    def __init__(self, inner: nn.Module, clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.inner, self.clock = inner, clock
        self.seconds = 0.0  # inside the model, forward and backward
        self.no_grad_seconds = 0.0  # the part in forward passes that build no graph (e.g. a final success check)
        self.sizes: list[int] = []
        self._entered: Optional[float] = None

    def forward(self, x):
        if x.requires_grad:
            x = _Mark.apply(x, self, False)
        t0 = self.clock()
        out = self.inner(x)
        spent = self.clock() - t0
        self.seconds += spent
        if not out.requires_grad:
            self.no_grad_seconds += spent
        self.sizes.append(x.shape[0])
        return _Mark.apply(out, self, True) if out.requires_grad and x.requires_grad else out


class PassCounter(nn.Module):
    """The wrapped model, counting its passes the way :class:`attacks.Report` does: every image through a forward
    call is one forward pass, every image whose output gradient flows back through the model one backward pass.
    The same instrument for every attack library, so their costs compare exactly."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.forward_passes = self.backward_passes = 0

    def reset(self) -> None:
        self.forward_passes = self.backward_passes = 0

    def _backward(self, grad):
        self.backward_passes += grad.shape[0]

    def forward(self, x):
        out = self.inner(x)
        self.forward_passes += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._backward)
        return out
