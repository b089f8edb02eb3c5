"""Running on several processes with PyTorch's own engine: ``torchrun`` + ``torch.distributed``.

``torchrun`` (or ``python -m torch.distributed.run``) starts the processes and tells each one who it is through
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`setup` reads them, joins the process group (NCCL on GPUs, gloo on CPUs) with a timeout,
picks this process's device (``cuda:LOCAL_RANK`` on GPUs) and returns a :class:`DistContext`. Without those
variables (or with ``WORLD_SIZE=1``) it returns :data:`SINGLE`: no process group, no collective, nothing changed.

Conventions every distributed command follows:

- rank 0 (``ctx.is_main``) alone writes files (checkpoints, reports, resume states) and prints results and
  progress; every rank reads the same command line, so all ranks take the same decisions;
- what only rank 0 can know (a resume state, a checkpoint on its disk) is read there and broadcast
  (:meth:`DistContext.on_main`), so errors are raised on every rank alike and no rank waits for a dead one;
- a failed collective (a peer died, was killed, or hung past the timeout) becomes :class:`DistributedError`, one
  clear line instead of a backend traceback, so the survivors stop within a bounded time.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import nn

from robustcnn.device import resolve_device
from robustcnn.errors import RobustCNNError, UsageError

T = TypeVar("T")

#: Seconds a process waits in a collective (or at start-up for the others) before giving up. A dead peer is
#: noticed at once (its sockets close); the timeout bounds the wait for a peer that hangs. Override with
#: ``ROBUSTCNN_DIST_TIMEOUT``.
DEFAULT_TIMEOUT = 1800.0

_ENV = ("RANK", "WORLD_SIZE")


class DistributedError(RobustCNNError):
    """A process of a distributed run failed, was killed or stopped answering (exit code 1)."""


class Forwarded(RobustCNNError):
    """An error rank 0 raised in a step only it runs, re-raised on the other ranks (rank 0 prints it)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class DistContext:
    """Who this process is in a (possibly one-process) run, and the few collectives robustcnn needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None  # None: no process group (one process)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops with one process) ------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            self._call(torch.distributed.barrier)

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        self._call(torch.distributed.all_gather_object, out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        self._call(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.enabled:
            self._call(torch.distributed.all_reduce, tensor)
        return tensor

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank; if it raised a robustcnn error (or an
        ``OSError``), every rank raises it: rank 0 the original, the others a silent :class:`Forwarded` copy."""
        if not self.enabled:
            return fn()
        outcome: Any = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except (RobustCNNError, OSError) as exc:
                code = exc.exit_code if isinstance(exc, RobustCNNError) else 1
                self.broadcast(("error", str(exc), code))
                raise
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            raise Forwarded(outcome[1], outcome[2])
        return outcome[1]

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then (if it worked) on the others: e.g. loading data that rank 0 may first have
        to download or decompress into a shared cache."""
        if not self.enabled:
            return fn()
        mine = self.on_main(fn)
        return mine if self.is_main else fn()

    @property
    def shard(self):
        """The :class:`attacks.evaluate.Shard` that splits evaluation stages over the ranks (None: one process)."""
        if not self.enabled:
            return None
        from attacks.evaluate import Shard

        return Shard(rank=self.rank, world_size=self.world_size, all_gather=self.all_gather)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in DistributedDataParallel (gradients averaged over the ranks at every step), or as it is."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo: RuntimeError; NCCL: DistBackendError (a RuntimeError)
            raise lost_peer(self, exc) from None


SINGLE = DistContext()


def lost_peer(ctx: DistContext, exc: BaseException) -> DistributedError:
    """The one-line error for a failed collective."""
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    detail = detail.split("] ", 1)[-1] if detail.startswith("[") else detail  # drop the backend's source path
    detail = detail.split(". ", 1)[0][:160].rstrip(". ")  # its first sentence: what happened
    return DistributedError(
        f"rank {ctx.rank} of {ctx.world_size}: lost contact with another process of the distributed run "
        f"({detail}); stopping. Run the same command again (train: with --resume) to resume from the last saved "
        "state")


def looks_distributed(exc: BaseException) -> bool:
    """Whether ``exc`` came out of the communication backend (e.g. DDP's all-reduce inside ``backward()``)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer"))


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or anything setting its environment variables)."""
    return all(k in os.environ for k in _ENV)


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 without ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def _int_env(name: str, default: Optional[int] = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise UsageError(f"${name} is not set: start distributed runs with torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"${name} must be an integer, got {raw!r}") from None


def timeout_seconds() -> float:
    raw = os.environ.get("ROBUSTCNN_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"$ROBUSTCNN_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def threads_per_process(local_world_size: int) -> int:
    """CPU threads for each of ``local_world_size`` processes on this machine: the usable cores divided evenly
    (at least 1), so N processes do not fight over the same cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def setup(device: str | torch.device = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group when started by ``torchrun``; return the context and this process's device.

    One process (no ``torchrun``, or ``WORLD_SIZE=1``): :data:`SINGLE` and the device as :func:`resolve_device`
    gives it, nothing else happens. Several: gloo on the CPU or NCCL on ``cuda:LOCAL_RANK``; CPU threads set to
    ``cores // LOCAL_WORLD_SIZE``; Python warnings silenced on ranks other than 0 (rank 0 reports them).
    """
    dev = resolve_device(device)
    if not launched() or _int_env("WORLD_SIZE") <= 1:
        return SINGLE, dev
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    local_rank = _int_env("LOCAL_RANK", 0)
    local_world = _int_env("LOCAL_WORLD_SIZE", world)
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UsageError(f"{local_world} processes per node but only {count} GPU(s) here: start torchrun with "
                             f"--nproc_per_node {count} or fewer, or use --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    torch.set_num_threads(threads_per_process(local_world))
    timeout = datetime.timedelta(seconds=timeout_seconds())
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                      backend=backend)
    try:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
    except (RuntimeError, ValueError) as exc:  # rendezvous failed: unreachable endpoint, timeout, bad variables
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedError(f"rank {rank} of {world}: could not join the distributed run "
                               f"({detail[:200]})") from None
    if not ctx.is_main:
        warnings.simplefilter("ignore")
    return ctx, dev


def teardown(ctx: DistContext, *, ok: bool) -> None:
    """Leave the process group: after a barrier when all went well (so no rank exits while others still send),
    at once after a failure (a barrier could wait for a dead peer)."""
    if not ctx.enabled or not torch.distributed.is_initialized():
        return
    if ok:
        try:
            ctx.barrier()
        except DistributedError:  # this rank's work is done; a rank that failed reports its own error
            pass
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001  (already broken: nothing left to clean)
        pass
