"""The query oracle: the only door from a black-box attack to the model.

A black-box attacker has an API, not a network: it sends images and gets back either the scores (``score`` kind:
the logits) or only the predicted label (``decision`` kind). :class:`QueryOracle` is that API, built on the attack's
:class:`~attacks.base.Context`:

* it runs the model under ``torch.no_grad()`` on detached inputs, so no gradient can ever reach the attacker;
* a ``decision`` oracle refuses to hand out scores;
* every query is counted for the sample it belongs to, into ``ctx.queries`` (so ``result.queries`` is exactly
  what the oracle counted), and a call that would take any sample past ``max_queries`` is refused before the
  model runs — an attack cannot overspend even by mistake;
* queries are images: rows outside [0, 1] are refused.

Every method takes a flat batch of rows and ``idx``, the batch position of the sample each row belongs to; ``idx``
may repeat a sample (several candidates of one sample in one model call), and each row costs that sample one query.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attacks.base import MAX_BATCH, MAX_QUERIES, Context, check_choice, check_int
from attacks.rng import SampleRNG

ORACLE_KINDS = ("score", "decision")

#: Most query rows per model call on a CPU, when the attack does not set ``rows_per_call`` (the pixel and patch
#: attacks use it too). Chosen by measurement (benchmarks/bench_floor.py prints the per-image time of a forward pass
#: by batch size): the built-in CNNs run the most images per second, or within the noise of the most, at 64-128
#: images per call on one thread, and 2-4x fewer at 1,024 (cache effects); a call this size still makes the per-call
#: overhead negligible. See docs/benchmarks.md.
CPU_ROWS_PER_CALL = 128
#: On an accelerator larger calls win; this only bounds memory.
ACCELERATOR_ROWS_PER_CALL = 16384


def default_rows_per_call(device: torch.device | str) -> int:
    """The measured default size of one model call for ``device`` (see :data:`CPU_ROWS_PER_CALL`)."""
    return CPU_ROWS_PER_CALL if torch.device(device).type == "cpu" else ACCELERATOR_ROWS_PER_CALL


def row_chunks(idx: Tensor, size: int) -> list[tuple[int, int]]:
    """Split ``len(idx)`` query rows into ``[start, end)`` slices of at most ``size`` rows, cutting only where the
    sample changes, so that a sample's consecutive rows stay in one model call (one sample with more than ``size``
    rows in a row gets a call of its own)."""
    n = idx.shape[0]
    if n <= size:
        return [(0, n)]
    cuts = ((idx[1:] != idx[:-1]).nonzero()[:, 0] + 1).tolist() + [n]  # where a new sample's rows begin, and the end
    chunks, start, j = [], 0, 0
    while start < n:
        # the last cut within `size` rows of `start`, or the first cut after it when one sample's rows are longer
        while j + 1 < len(cuts) and cuts[j + 1] - start <= size:
            j += 1
        end = cuts[j] if cuts[j] > start else cuts[j + 1]
        chunks.append((start, end))
        start = end
        while cuts[j] <= start and j + 1 < len(cuts):
            j += 1
    return chunks


class QueryBudgetError(RuntimeError):
    """An attack asked for more queries on a sample than its budget allows (a bug in the attack, not the input)."""


class ScoresUnavailableError(RuntimeError):
    """A decision-based attack asked the oracle for scores."""


class QueryOracle:
    """Query access to ``ctx.model`` for one attack call: scores or labels, counted per sample, under a budget.

    Args:
        ctx: the attack call's context (model, inputs, labels, per-sample random streams and query counters).
        kind: ``"score"`` (logits are visible) or ``"decision"`` (only the top label is).
        max_queries: the most queries any one sample may receive during this call.
        rows_per_call: the most rows one model call runs; a larger query is split into several calls (between
            samples, never inside one sample's consecutive rows). It changes speed only, never what is counted or
            returned. None: :func:`default_rows_per_call` for the inputs' device.
    """

    def __init__(self, ctx: Context, kind: str, max_queries: int, rows_per_call: Optional[int] = None):
        check_choice("kind", kind, ORACLE_KINDS)
        check_int("max_queries", max_queries, high=MAX_QUERIES)
        if rows_per_call is not None:
            check_int("rows_per_call", rows_per_call, high=MAX_BATCH)
        self._ctx = ctx
        self.kind = kind
        self.max_queries = max_queries
        self.rows_per_call = rows_per_call if rows_per_call is not None else default_rows_per_call(ctx.x.device)

    # -- what the attacker legitimately knows: its own inputs, labels, goal and random source --------------------
    @property
    def x(self) -> Tensor:
        return self._ctx.x

    @property
    def n(self) -> int:
        return self._ctx.n

    @property
    def targeted(self) -> bool:
        return self._ctx.targeted

    @property
    def rng(self) -> SampleRNG:
        """Per-sample random streams: draw with ``rng.uniform(idx, shape)`` etc. for the samples at ``idx``."""
        return self._ctx.rng

    def label_of(self, idx: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """True labels and targets (or None) of the samples at ``idx``."""
        return self._ctx.label_of(idx)

    # -- the budget -----------------------------------------------------------------------------------------------
    def used(self, idx: Tensor) -> Tensor:
        """Queries already spent on the samples at ``idx``."""
        return self._ctx.queries[idx]

    def remaining(self, idx: Tensor) -> Tensor:
        """Queries the samples at ``idx`` may still receive."""
        return self.max_queries - self._ctx.queries[idx]

    # -- queries --------------------------------------------------------------------------------------------------
    def scores(self, x: Tensor, idx: Tensor) -> Tensor:
        """Logits of the rows of ``x`` (score oracles only); each row costs its sample one query."""
        if self.kind != "score":
            raise ScoresUnavailableError("a decision-based attack sees only labels; it asked the oracle for scores")
        return self._query(x, idx)

    def labels(self, x: Tensor, idx: Tensor) -> Tensor:
        """Predicted labels of the rows of ``x``; each row costs its sample one query."""
        return self._query(x, idx).argmax(dim=1)

    def is_adversarial(self, x: Tensor, idx: Tensor) -> Tensor:
        """Whether each row of ``x`` meets its sample's goal (label changed, or target reached); one query a row."""
        return self.meets_goal(self.labels(x, idx), idx)

    def meets_goal(self, labels: Tensor, idx: Tensor) -> Tensor:
        """Whether predicted ``labels`` meet the goal of the samples at ``idx`` (no query)."""
        ctx = self._ctx
        return labels.ne(ctx.y[idx]) if ctx.target is None else labels.eq(ctx.target[idx])

    def _query(self, x: Tensor, idx: Tensor) -> Tensor:
        if x.shape[0] != idx.shape[0]:
            raise ValueError(f"{x.shape[0]} query rows but {idx.shape[0]} sample indices")
        if x.shape[0] == 0:
            raise ValueError("empty query: an attack must not call the oracle with no rows")
        # Charge first and check after (one device sync for both checks); a refused query is refunded before any
        # model call, so it costs nothing and shows nothing.
        counts = self._ctx.queries
        ones = torch.ones_like(idx)
        counts.index_add_(0, idx, ones)
        x = x.detach()
        low, high = torch.aminmax(x)
        if bool((counts[idx].max() > self.max_queries) | (low < 0) | (high > 1)):
            wanted = counts.clone()
            counts.index_add_(0, idx, -ones)
            if bool((low < 0) | (high > 1)):
                raise ValueError("query images must lie in [0, 1]")
            worst = int(wanted.argmax())
            raise QueryBudgetError(
                f"sample {worst} would receive {int(wanted[worst])} queries, over the budget of {self.max_queries}"
            )
        chunks = row_chunks(idx, self.rows_per_call)
        if len(chunks) == 1:
            return self._ctx.uncounted_logits(x)  # under torch.no_grad(); counted above, one query per row
        return torch.cat([self._ctx.uncounted_logits(x[a:b]) for a, b in chunks])
