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

from attacks.base import Context, check_choice, check_int
from attacks.rng import SampleRNG

ORACLE_KINDS = ("score", "decision")


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
    """

    def __init__(self, ctx: Context, kind: str, max_queries: int):
        check_choice("kind", kind, ORACLE_KINDS)
        check_int("max_queries", max_queries)
        self._ctx = ctx
        self.kind = kind
        self.max_queries = max_queries

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
        wanted = self._ctx.queries + torch.bincount(idx, minlength=self.n)
        if bool((wanted > self.max_queries).any()):
            worst = int(wanted.argmax())
            raise QueryBudgetError(
                f"sample {worst} would receive {int(wanted[worst])} queries, over the budget of {self.max_queries}"
            )
        x = x.detach()
        if bool((x.min() < 0) | (x.max() > 1)):
            raise ValueError("query images must lie in [0, 1]")
        return self._ctx.logits(x, idx)  # runs under torch.no_grad() and counts one query per row
