"""The CLI side of distributed runs: one ``with session(device) as (ctx, dev):`` per command.

It joins the process group when the command was started by ``torchrun`` (and does nothing otherwise), turns
SIGTERM (what ``torchrun`` sends the surviving ranks when one fails) into an interruption, turns a failed
collective into one clear line, and leaves the group cleanly.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from robustcnn.distributed import DistContext, lost_peer, looks_distributed, setup, teardown, world_size
from robustcnn.errors import UsageError
from robustcnn.perf import keep_freed_memory


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM stop a command the way Ctrl-C does (what is saved stays as it is)."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def session(device: str) -> Iterator[tuple[DistContext, torch.device]]:
    """This process's :class:`DistContext` and device for the duration of a command (with glibc's malloc told to
    keep freed memory for reuse: :func:`robustcnn.perf.keep_freed_memory`)."""
    keep_freed_memory()
    ctx, dev = setup(device)
    ok = False
    try:
        if ctx.enabled:
            with sigterm_interrupts():
                yield ctx, dev
        else:
            yield ctx, dev
        ok = True
    except RuntimeError as exc:
        if ctx.enabled and looks_distributed(exc):  # e.g. DDP's all-reduce inside backward()
            raise lost_peer(ctx, exc) from None
        raise
    finally:
        teardown(ctx, ok=ok)


def refuse_distributed(command: str) -> None:
    """For commands that do not split their work: refuse to run N copies of themselves under torchrun."""
    if world_size() > 1:
        raise UsageError(f"robustcnn {command} does not run distributed: start it without torchrun "
                         "(train, attack and report do)")
