"""Robust-accuracy evaluation: a cascade of attacks with the per-sample worst case.

>>> report = attacks.evaluate(model, (x_test, y_test), [attacks.APGD(eps=0.1), attacks.APGDT(eps=0.1)], seed=0)
>>> report.clean_accuracy, report.robust_accuracy, report.per_attack["apgd"].success_rate

Each attack only sees the samples still correctly classified after the attacks before it (the cascade), re-batched
to full batches; so the robust accuracy is the worst case over all attacks per sample, and the cost falls as the
attacks succeed. The model is put in eval mode for the run and restored afterwards, whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from attacks.base import (PROBABILITIES_WARNING, Attack, ModelOutputWarning, ModelState, check_labels,
                          looks_like_probabilities, model_dtype)
from attacks.rng import sample_keys

ProgressFn = Callable[[str, int, int], None]


@dataclass
class AttackStats:
    """How one attack of the cascade did on the samples it saw."""

    name: str
    config: dict
    seen: int = 0
    successes: int = 0
    seconds: float = 0.0
    queries: list[int] = field(default_factory=list, repr=False)  # per sample seen
    gradients: list[int] = field(default_factory=list, repr=False)
    norms: list[float] = field(default_factory=list, repr=False)  # per successful sample
    success_queries: list[int] = field(default_factory=list, repr=False)  # per successful sample
    checks: int = 0  # forward passes the referee spent to learn which samples were fooled (not queries)
    skipped: bool = False  # an escalation the cascade did not need (see :class:`attacks.suites.Escalation`)

    @property
    def success_rate(self) -> float:
        return self.successes / self.seen if self.seen else float("nan")

    def _q(self, which: str) -> np.ndarray:
        return np.asarray(getattr(self, which), dtype=np.float64)

    @property
    def queries_mean(self) -> float:
        """Mean forward passes per sample seen."""
        return float(self._q("queries").mean()) if self.seen else float("nan")

    @property
    def queries_median(self) -> float:
        return float(np.median(self._q("queries"))) if self.seen else float("nan")

    @property
    def queries_mean_success(self) -> float:
        """Mean forward passes per *successful* sample."""
        return float(self._q("success_queries").mean()) if self.success_queries else float("nan")

    @property
    def queries_median_success(self) -> float:
        """Median forward passes per *successful* sample (the usual black-box figure)."""
        return float(np.median(self._q("success_queries"))) if self.success_queries else float("nan")

    @property
    def forward_passes(self) -> int:
        """Forward passes of the model spent on all samples seen (one image through the model is one pass): the
        attack's queries and the referee's checks."""
        return int(sum(self.queries)) + self.checks

    @property
    def backward_passes(self) -> int:
        """Backward passes (input gradients) spent on all samples seen."""
        return int(sum(self.gradients))

    @property
    def gradients_mean(self) -> float:
        return float(self._q("gradients").mean()) if self.seen else float("nan")

    @property
    def max_norm(self) -> float:
        """Largest perturbation among the successful samples (0 when none)."""
        return float(self._q("norms").max()) if self.norms else 0.0

    @property
    def mean_norm(self) -> float:
        return float(self._q("norms").mean()) if self.norms else float("nan")

    @property
    def median_norm(self) -> float:
        return float(np.median(self._q("norms"))) if self.norms else float("nan")

    def to_dict(self) -> dict:
        return {
            "name": self.name, "config": self.config, "seen": self.seen, "successes": self.successes,
            "success_rate": self.success_rate, "queries_mean": self.queries_mean,
            "queries_median": self.queries_median, "queries_mean_success": self.queries_mean_success,
            "queries_median_success": self.queries_median_success,
            "gradients_mean": self.gradients_mean,
            "forward_passes": self.forward_passes, "backward_passes": self.backward_passes, "skipped": self.skipped,
            "max_norm": self.max_norm, "mean_norm": self.mean_norm, "median_norm": self.median_norm,
            "seconds": self.seconds,
        }


@dataclass
class Report:
    """Result of :func:`evaluate`. Per-sample arrays are indexed like the evaluated data."""

    n: int
    clean_correct: Tensor  # bool (n,)
    robust: Tensor  # bool (n,): correct and not fooled by any attack
    fooled_by: Tensor  # long (n,): index of the first attack that fooled the sample, -1 if none
    norms: Tensor  # float (n,): perturbation size of the fooling example (nan if not fooled)
    queries: Tensor  # long (n,): forward passes spent on the sample over all attacks
    per_attack: dict[str, AttackStats]
    seconds: float
    config: dict
    warnings: list[str]
    x_adv: Optional[Tensor] = None  # (n, ...) adversarial examples where fooled, else the clean input
    #: (forward, backward) passes spent outside the attacks: the clean classification and the sanity checks
    overhead_passes: tuple[int, int] = (0, 0)

    @property
    def passes(self) -> dict[str, int]:
        """Every pass of the model the evaluation made, exactly: ``forward`` (images through the model) and
        ``backward`` (input gradients), the attacks' and the clean classification's and sanity checks'."""
        fwd, bwd = self.overhead_passes
        return {"forward": fwd + sum(st.forward_passes for st in self.per_attack.values()),
                "backward": bwd + sum(st.backward_passes for st in self.per_attack.values())}

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean()) if self.n else float("nan")

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if self.n else float("nan")

    def to_dict(self, per_sample: bool = False) -> dict:
        out = {
            "n": self.n, "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
            "attacks": {k: v.to_dict() for k, v in self.per_attack.items()},
            "passes": self.passes, "seconds": self.seconds, "config": self.config, "warnings": list(self.warnings),
        }
        if per_sample:
            names = list(self.per_attack)
            out["per_sample"] = {
                "clean_correct": self.clean_correct.tolist(), "robust": self.robust.tolist(),
                "fooled_by": [names[i] if i >= 0 else None for i in self.fooled_by.tolist()],
                "norm": [None if v != v else v for v in self.norms.tolist()], "queries": self.queries.tolist(),
            }
        return out


def _as_tensors(data) -> tuple[Tensor, Tensor]:
    """Accept ``(x, y)`` tensors or an iterable of ``(x, y)`` batches; uint8 images are scaled to [0, 1]."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
    else:
        xs, ys = zip(*((bx, by) for bx, by in data))
        x, y = torch.cat(list(xs)), torch.cat(list(ys))
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data has {x.shape[0]} images but {y.shape[0]} labels")
    return x, y.long()


def attack_stream(atk: Attack) -> int:
    """A stream id derived from the attack's name and hyperparameters: the same attack draws the same random
    numbers for a sample whether it runs alone or inside a cascade, so the cascade's worst case can only be lower."""
    text = json.dumps(atk.config(), sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _unique_names(attack_list: Sequence[Attack]) -> list[str]:
    names, seen = [], {}
    for a in attack_list:
        seen[a.name] = seen.get(a.name, 0) + 1
        names.append(a.name if seen[a.name] == 1 else f"{a.name}#{seen[a.name]}")
    return names


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True)
class Shard:
    """How the samples of each stage are split over cooperating processes (e.g. the ranks of ``torchrun``).

    This process attacks every ``world_size``-th sample of a stage, starting at ``rank``; ``all_gather(obj)``
    must return every process's ``obj`` in rank order (``torch.distributed.all_gather_object`` does). The parts
    are merged back in sample order, so every process ends each stage with the result one process would have
    had: a sample's random stream is keyed by its index in the whole data, never by its position in a part.
    """

    rank: int
    world_size: int
    all_gather: Callable[[Any], list]

    def part(self, idx: Tensor) -> Tensor:
        """This process's share of the samples at ``idx`` (strided, so work stays balanced after a cascade)."""
        return idx[self.rank :: self.world_size]


def _active(shard: Optional[Shard]) -> bool:
    return shard is not None and shard.world_size > 1


@dataclass
class StageResult:
    """One attack of a cascade run on the samples at ``idx`` (positions in the evaluated data)."""

    idx: Tensor
    fooled: Tensor  # bool, aligned with idx
    norms: Tensor  # float, aligned with idx
    queries: Tensor  # long, aligned with idx
    stats: AttackStats
    x_adv: Optional[Tensor] = None  # aligned with idx, on the CPU


def merge_stages(parts: Sequence[StageResult]) -> StageResult:
    """Join one stage's results on disjoint sets of samples (one part per process) into the result of one run on
    all of them: per-sample arrays and statistics in sample order, ``seconds`` the slowest part's wall time."""
    idx = torch.cat([p.idx for p in parts])
    order = torch.sort(idx, stable=True).indices
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])[order]  # noqa: E731
    fooled, norms, queries = cat("fooled"), cat("norms"), cat("queries")
    gradients = torch.tensor([g for p in parts for g in p.stats.gradients], dtype=torch.long)
    first = parts[0].stats
    st = AttackStats(name=first.name, config=first.config, seen=int(idx.numel()), successes=int(fooled.sum()),
                     seconds=max(p.stats.seconds for p in parts), checks=sum(p.stats.checks for p in parts),
                     skipped=first.skipped)
    st.queries = queries.tolist()
    st.gradients = gradients[order].tolist()
    st.norms = norms[fooled].tolist()
    st.success_queries = queries[fooled].tolist()
    x_adv = cat("x_adv") if all(p.x_adv is not None for p in parts) else None
    return StageResult(idx=idx[order], fooled=fooled, norms=norms, queries=queries, stats=st, x_adv=x_adv)


def run_stage(model: nn.Module, x_all: Tensor, y_all: Tensor, idx: Tensor, atk: Attack, name: str, *,
              batch_size: int, device: torch.device, seed: int, target: Optional[Tensor] = None,
              keep_examples: bool = False, progress: Optional[ProgressFn] = None,
              shard: Optional[Shard] = None) -> StageResult:
    """Run ``atk`` on the samples at ``idx`` in batches. Each sample draws from its own random stream, keyed by
    (seed, its index in the data, the attack's config), so results do not depend on batching or cascade order.

    The building block of :func:`cascade`, and of resumable reports that save after each stage.
    The model must already be in the mode it is to be attacked in. With ``shard``, this process attacks its part
    of ``idx`` and every process returns the merged result (all processes must call it with the same ``idx``).
    """
    if _active(shard):
        world = shard.world_size
        scaled = None if progress is None else \
            (lambda nm, done, total: progress(nm, min(done * world, idx.numel()), idx.numel()))
        mine = run_stage(model, x_all, y_all, shard.part(idx), atk, name, batch_size=batch_size, device=device,
                         seed=seed, target=target, keep_examples=keep_examples, progress=scaled)
        return merge_stages(shard.all_gather(mine))
    st = AttackStats(name=name, config=atk.config())
    fooled = torch.zeros(idx.numel(), dtype=torch.bool)
    norms = torch.full((idx.numel(),), float("nan"))
    queries = torch.zeros(idx.numel(), dtype=torch.long)
    x_adv = x_all[idx].clone() if keep_examples else None
    t0 = time.perf_counter()
    per_call = atk.samples_per_call(batch_size)
    for s in range(0, idx.numel(), per_call):
        part = idx[s : s + per_call]
        tgt = None if target is None else target[part].to(device)
        with warnings.catch_warnings():  # the caller reports model-level warnings once (sanity_warnings)
            warnings.simplefilter("ignore", ModelOutputWarning)
            res = atk(model, x_all[part].to(device), y_all[part].to(device), target=tgt,
                      generator=sample_keys(seed, part, attack_stream(atk)))
        ok, q, nr = res.success.cpu(), res.queries.cpu(), res.norms.cpu().float()
        sl = slice(s, s + part.numel())
        fooled[sl], queries[sl] = ok, q
        norms[sl] = torch.where(ok, nr, torch.full_like(nr, float("nan")))
        if x_adv is not None:
            x_adv[sl][ok] = res.x_adv.cpu()[ok].to(x_adv.dtype)
        st.seen += part.numel()
        st.successes += int(ok.sum())
        st.queries += q.tolist()
        st.gradients += res.gradients.cpu().tolist()
        st.checks += 0 if res.checks is None else int(res.checks.sum())
        st.norms += nr[ok].tolist()
        st.success_queries += q[ok].tolist()
        if progress is not None:
            progress(name, s + part.numel(), idx.numel())
    st.seconds = time.perf_counter() - t0
    return StageResult(idx=idx, fooled=fooled, norms=norms, queries=queries, stats=st, x_adv=x_adv)


def correctly_classified(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int, device: torch.device,
                         shard: Optional[Shard] = None) -> Tensor:
    """Boolean mask (on the CPU) of the samples the model classifies correctly without attack.
    With ``shard``, each process classifies its part and every process returns the whole mask."""
    if _active(shard):
        everything = torch.arange(x.shape[0])
        part = shard.part(everything)
        parts = shard.all_gather(correctly_classified(model, x[part], y[part], batch_size=batch_size, device=device))
        out = torch.zeros(x.shape[0], dtype=torch.bool)
        for r, ok in enumerate(parts):
            out[everything[r :: shard.world_size]] = ok
        return out
    out = torch.zeros(x.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            logits = model(x[s : s + batch_size].to(device))
            check_labels(y[s : s + batch_size], logits.shape[1])
            pred = logits.argmax(dim=1).cpu()
            out[s : s + batch_size] = pred == y[s : s + batch_size].cpu()
    return out


@dataclass
class Cascade:
    """Where a cascade left each sample (arrays indexed like the data)."""

    robust: Tensor  # bool (n,): in the starting set and fooled by no attack
    fooled_by: Tensor  # long (n,): index of the attack that fooled the sample, -1 if none


def needless(atk: Attack, ai: int, fooled_by: Tensor, seen_before: int) -> bool:
    """Whether attack ``ai`` of a cascade is an escalation that the attack before it, which saw ``seen_before``
    samples, gave no reason to run; ``fooled_by`` holds the cascade's state so far."""
    from attacks.suites import Escalation

    return isinstance(atk, Escalation) and not atk.wanted(int((fooled_by == ai - 1).sum()), seen_before)


#: Called as ``on_stage(attack_index, stage)`` after each attack of a cascade ran.
StageFn = Callable[[int, StageResult], None]


def cascade(model: nn.Module, x_all: Tensor, y_all: Tensor, attack_list: Sequence[Attack], *, start: Tensor,
            names: Sequence[str], batch_size: int, device: torch.device, seed: int, target: Optional[Tensor] = None,
            keep_examples: bool = False, progress: Optional[ProgressFn] = None, shard: Optional[Shard] = None,
            finished: Optional[Mapping[int, Tensor]] = None, on_stage: Optional[StageFn] = None) -> Cascade:
    """Run ``attack_list`` in order, each with :func:`run_stage` on the samples of ``start`` (a bool mask, usually
    the correctly classified ones) that no attack before it fooled: the per-sample worst case over the attacks.

    An :class:`attacks.suites.Escalation` runs only when the attack before it fooled enough samples; otherwise its
    stage is empty and marked ``skipped``. ``names[i]`` names attack ``i`` in its statistics and progress.
    ``on_stage(i, stage)`` receives each attack's :class:`StageResult` as soon as it ran (the cascade itself keeps
    only the masks). ``finished`` maps an attack's index to the sample indices it fooled in an earlier run on the
    same samples: that attack is not run again and the cascade goes on as if it had been, so a run resumed from
    saved stages ends exactly as an uninterrupted one.
    The model must already be in the mode it is to be attacked in.
    """
    robust = start.clone()
    fooled_by = torch.full((robust.numel(),), -1, dtype=torch.long)
    seen_before = 0
    for ai, (atk, name) in enumerate(zip(attack_list, names)):
        seen = int(robust.sum())
        if finished is not None and ai in finished:
            won = finished[ai]
        else:
            idx = robust.nonzero().squeeze(1)
            skip = needless(atk, ai, fooled_by, seen_before)
            stage = run_stage(model, x_all, y_all, idx[:0] if skip else idx, atk, name, batch_size=batch_size,
                              device=device, seed=seed, target=target, keep_examples=keep_examples,
                              progress=progress, shard=shard)
            stage.stats.skipped = skip
            won = stage.idx[stage.fooled]
            if on_stage is not None:
                on_stage(ai, stage)
        robust[won] = False
        fooled_by[won] = ai
        seen_before = seen
    return Cascade(robust=robust, fooled_by=fooled_by)


#: Samples :func:`evaluate` runs :func:`sanity_warnings` on (the first ones).
SANITY_SAMPLES = 64


def sanity_passes(m: int) -> tuple[int, int]:
    """(forward, backward) passes :func:`sanity_warnings` makes on ``m`` samples: two plain calls and one with a
    gradient."""
    return 3 * m, m


def sanity_warnings(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """Cheap checks for signs of a broken or gradient-masked evaluation, on a small batch."""
    out = []
    with torch.no_grad():
        a, b = model(x), model(x)
    if not torch.isfinite(a).all():
        out.append("the model returns non-finite outputs (NaN/inf) on clean inputs")
        return out
    if not torch.equal(a, b):
        out.append("the model's outputs differ between identical calls (a randomized model): use EOT attacks "
                   "(eotpgd) and expect noisy numbers")
    if looks_like_probabilities(a):
        out.append(PROBABILITIES_WARNING)
    check_labels(y, a.shape[1])
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(model(xg), y.long(), reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)
    zero = (g.flatten(1).abs().amax(dim=1) == 0).float().mean().item()
    if zero > 0.5:
        out.append(f"the loss gradient is exactly zero for {zero:.0%} of clean samples (gradient masking?): "
                   "gradient attacks will look weak; add black-box attacks")
    return out


def evaluate(
    model: nn.Module,
    data,
    attack_list: Sequence[Attack],
    *,
    batch_size: Optional[int] = None,
    device: Optional[str | torch.device] = None,
    seed: int = 0,
    keep_examples: bool = False,
    target: Optional[Tensor] = None,
    progress: Optional[ProgressFn] = None,
    shard: Optional[Shard] = None,
) -> Report:
    """Clean and worst-case robust accuracy of ``model`` on ``data`` under a cascade of attacks.

    Args:
        model: classifier on images in [0, 1] returning logits. Put in eval mode for the run, then restored.
            It is not moved: ``device`` defaults to the model's device and must match it when given.
        data: ``(x, y)`` tensors (float in [0, 1] or uint8) or an iterable of such batches.
        attack_list: attacks run in this order; each only sees the samples still robust.
        batch_size: samples per attack call. Default: 250 on a CPU (cache-sized batches are the fastest per
            image for small CNNs there), 1024 on a GPU.
        seed: seeds every random draw; each sample has its own stream per attack, so the result does not
            depend on ``batch_size`` or on the order of the cascade.
        keep_examples: also return the adversarial examples (``report.x_adv``, on the CPU).
        target: per-sample target classes (n,) for targeted attacks; a sample then counts as fooled only when
            the attack reaches its target, and ``robust`` means "target not reached".
        progress: called as ``progress(attack_name, samples_done, samples_total)``.
        shard: split every stage's samples over cooperating processes (see :class:`Shard`); each process must
            pass the same data and arguments and gets the same report, equal to the one-process report sample by
            sample (``seconds`` aside).
    """
    start = time.perf_counter()
    dev = _model_device(model) if device is None else torch.device(device)
    if dev != _model_device(model):
        raise ValueError(f"the model is on {_model_device(model)}, not {dev}: move it with model.to(...) first")
    if batch_size is None:
        batch_size = 1024 if dev.type == "cuda" else 250
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_all, y_all = _as_tensors(data)
    x_all = x_all.to(model_dtype(model) or x_all.dtype)
    n = x_all.shape[0]
    if target is not None:
        target = torch.as_tensor(target).long().cpu().expand(n) if torch.as_tensor(target).dim() == 0 \
            else torch.as_tensor(target).long().cpu()
        if target.shape != (n,):
            raise ValueError(f"target must be an int or have shape ({n},), got {tuple(target.shape)}")
    names = _unique_names(attack_list)

    saved = ModelState(model)
    model.eval()
    try:
        notes = sanity_warnings(model, x_all[:SANITY_SAMPLES].to(dev), y_all[:SANITY_SAMPLES].to(dev)) if n else []
        clean = correctly_classified(model, x_all, y_all, batch_size=batch_size, device=dev, shard=shard)
        norms = torch.full((n,), float("nan"))
        queries = torch.zeros(n, dtype=torch.long)
        x_adv = x_all.clone() if keep_examples else None
        stats: dict[str, AttackStats] = {}

        def absorb(ai: int, stage: StageResult) -> None:
            stats[names[ai]] = stage.stats
            won = stage.idx[stage.fooled]
            norms[won] = stage.norms[stage.fooled]
            queries[stage.idx] += stage.queries
            if x_adv is not None:
                x_adv[won] = stage.x_adv[stage.fooled].to(x_adv.dtype)

        result = cascade(model, x_all, y_all, attack_list, start=clean, names=names, batch_size=batch_size,
                         device=dev, seed=seed, target=target, keep_examples=keep_examples, progress=progress,
                         shard=shard, on_stage=absorb)
    finally:
        saved.restore()

    config = {
        "seed": seed, "batch_size": batch_size, "device": str(dev), "targeted": target is not None,
        "processes": shard.world_size if _active(shard) else 1,
        "attacks": [a.config() for a in attack_list],
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    for w in notes:
        warnings.warn(w, stacklevel=2)
    fwd, bwd = sanity_passes(min(n, SANITY_SAMPLES)) if n else (0, 0)
    return Report(n=n, clean_correct=clean, robust=result.robust, fooled_by=result.fooled_by, norms=norms,
                  queries=queries, per_attack=stats, seconds=time.perf_counter() - start, config=config,
                  warnings=notes, x_adv=x_adv, overhead_passes=(n + fwd, bwd))
