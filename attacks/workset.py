"""The samples still under attack, and the results of those that are done.

Every attack loop that stops early for a sample keeps its per-sample state *compacted* to the samples it still works
on, so each model call serves exactly the samples that need it. Two pieces do the bookkeeping:

* :class:`Results` — ``x_adv``, ``logits`` and ``fooled`` for every sample of a batch, filled in as samples finish.
* :class:`WorkSet` — the samples still worked on: ``pos`` (their rows in the :class:`Results`), ``ids`` (their
  batch positions, for the model, the labels and the random streams) and the attack's per-sample state as named
  tensors (``work.cur``, ``work.grad``, ...). :meth:`WorkSet.retire` records the finished samples' results and drops
  them; :meth:`WorkSet.keep` compacts every per-sample tensor at once; :meth:`WorkSet.join` admits new samples.

>>> work = WorkSet.batch(x0, cur=x0.clone())        # every sample, with a fresh Results store
>>> work.retire(fooled, work.cur, logits)           # fooled samples leave with their current point
>>> work.cur = step(work.cur)                       # the state of the others lives on
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

#: A per-sample field: a tensor whose first dimension runs over the work set, a tuple of such tensors, or None.
Field = Union[Tensor, tuple[Tensor, ...], None]


class Results:
    """``x_adv``, ``logits`` and ``fooled`` of every sample of a batch, filled in as samples are recorded.

    ``x`` is the batch's clean input; a sample never recorded keeps it (it is copied on the first record, so an
    attack whose samples all stay to the end pays for no copy). ``ids``: the batch positions of the rows (None: row
    ``i`` is sample ``i``). ``logits`` is allocated on the first record that has logits and stays None otherwise.
    """

    def __init__(self, x: Tensor, ids: Optional[Tensor] = None):
        self._x = x
        self._copied = False
        self.ids = ids
        self.logits: Optional[Tensor] = None
        self.fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    @property
    def x_adv(self) -> Tensor:
        return self._x

    @property
    def recorded(self) -> bool:
        """Whether any sample has been recorded."""
        return self._copied

    def __len__(self) -> int:
        return self._x.shape[0]

    def record(self, rows: Tensor, x: Tensor, logits: Optional[Tensor] = None, fooled: Optional[Tensor] = None) -> None:
        """Store ``x`` (and ``logits``, ``fooled``: one entry per row) as the results of ``rows``."""
        if not self._copied:
            self._x, self._copied = self._x.clone(), True
        self._x[rows] = x.to(self._x)
        if logits is not None:
            if self.logits is None:
                self.logits = logits.new_empty(len(self), logits.shape[1])
            self.logits[rows] = logits
        if fooled is not None:
            self.fooled[rows] = fooled


def _take(value: Field, mask: Tensor) -> Field:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(v[mask] for v in value)
    return value[mask]


def _cat(a: Field, b: Field) -> Field:
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(torch.cat([u, v]) for u, v in zip(a, b))
    return torch.cat([a, b])


class WorkSet:
    """The samples still under attack: ``pos`` (rows of ``results``), ``ids`` (batch positions) and named state.

    Per-sample state is set and read as attributes (``work.cur = ...``); every field's first dimension runs over the
    work set (or the field is a tuple of such tensors, or None), and :meth:`keep`, :meth:`retire` and :meth:`join`
    act on all of them at once. ``ids`` is ``results.ids[pos]`` (``pos`` itself when the results are the batch).
    """

    def __init__(self, results: Results, pos: Tensor, **fields: Field):
        object.__setattr__(self, "results", results)
        object.__setattr__(self, "_fields", {})
        self._set_pos(pos)
        for name, value in fields.items():
            setattr(self, name, value)

    @classmethod
    def batch(cls, x: Tensor, **fields: Field) -> "WorkSet":
        """Every sample of the batch ``x`` (its clean input), with a fresh :class:`Results` store."""
        return cls(Results(x), torch.arange(x.shape[0], device=x.device), **fields)

    def _set_pos(self, pos: Tensor) -> None:
        object.__setattr__(self, "pos", pos)
        object.__setattr__(self, "ids", pos if self.results.ids is None else self.results.ids[pos])

    # -- named state ---------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("_fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(f"the work set has no field {name!r}")

    def __setattr__(self, name: str, value: Field) -> None:
        if name in ("results", "pos", "ids"):
            raise AttributeError(f"{name} is managed by the work set")
        self._fields[name] = value

    def __len__(self) -> int:
        return self.pos.shape[0]

    @property
    def empty(self) -> bool:
        return self.pos.numel() == 0

    # -- leaving and joining -------------------------------------------------------------------------------------
    def keep(self, mask: Tensor) -> None:
        """Keep only the samples where ``mask`` holds, in every field."""
        self._set_pos(self.pos[mask])
        for name, value in self._fields.items():
            self._fields[name] = _take(value, mask)

    def record(self, done: Tensor, x: Tensor, logits: Optional[Tensor] = None, fooled: Optional[Tensor] = None) -> None:
        """Record results for the samples where ``done`` holds; ``x``, ``logits`` and ``fooled`` have one row per
        *recorded* sample, in order. The samples stay in the work set (see :meth:`retire`)."""
        self.results.record(self.pos[done], x, logits, fooled)

    def retire(self, done: Tensor, x: Tensor, logits: Optional[Tensor] = None,
               fooled: Optional[Tensor] = None) -> None:
        """Record ``x[done]`` (and ``logits[done]``, ``fooled[done]``; one row per working sample) as the results
        of the samples where ``done`` holds, and drop those samples from the work set."""
        if not bool(done.any()):
            return
        self.record(done, x[done], None if logits is None else logits[done], None if fooled is None else fooled[done])
        self.keep(~done)

    def retire_all(self, x: Tensor, logits: Optional[Tensor] = None, fooled: Optional[Tensor] = None) -> None:
        """End the work: every sample left keeps ``x`` (one row per working sample) as its result."""
        if not self.empty:
            self.results.record(self.pos, x, logits, fooled)
        self.keep(torch.zeros_like(self.pos, dtype=torch.bool))

    def join(self, new: "WorkSet") -> None:
        """Admit the samples of ``new`` (same results store, same fields) after the ones already here."""
        if new.results is not self.results:
            raise ValueError("a work set can only admit samples of the same results store")
        if self.empty:
            self._set_pos(new.pos)
            self._fields.update(new._fields)
            return
        if set(self._fields) != set(new._fields):
            raise ValueError(f"work sets with different fields: {sorted(self._fields)} and {sorted(new._fields)}")
        self._set_pos(torch.cat([self.pos, new.pos]))
        for name, value in self._fields.items():
            self._fields[name] = _cat(value, new._fields[name])
