"""Black-box attacks: they reach the model only through the query oracle, never use a gradient, never overspend, and
``queries`` is exactly what the model was asked. (The generic contract is in test_attack_contract.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attacks
from attacks.base import Context
from attacks.norms import get_norm
from attacks.oracle import QueryBudgetError, QueryOracle, ScoresUnavailableError
from attacks.rng import SampleRNG, sample_keys
from attacks.simba import dct_matrix
from attacks.square import p_schedule

SCORE = attacks.available("score")
DECISION = attacks.available("decision")
BLACK_BOX = SCORE + DECISION
def build(name: str, max_queries: int, **kw):
    """The attack with the fast settings its fields declare (small estimates; score attacks: a large Linf budget,
    0.3) and the query budget given."""
    return attacks.build(name, **{**attacks.get(name).fast, "max_queries": max_queries, **kw})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class NoGradModel(nn.Module):
    """Refuses to run where a gradient could be taken: proof that an attack only queries."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if torch.is_grad_enabled() or x.requires_grad:
            raise AssertionError("a black-box attack ran the model with autograd enabled")
        return self.inner(x)


class Recorder(nn.Module):
    """Keeps every input batch while ``armed``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.armed = True
        self.calls: list[torch.Tensor] = []

    def forward(self, x):
        if self.armed:
            self.calls.append(x.detach().clone())
        return self.inner(x)


def run_recorded(monkeypatch, atk, model, x, y, **kw):
    """Run ``atk``; return (result, the batches the model saw during the attack itself, not the referee's pass)."""
    rec = Recorder(model).eval()
    cls = type(atk)
    inner_run = cls._run

    def run_then_disarm(self, ctx):
        try:
            return inner_run(self, ctx)
        finally:
            rec.armed = False

    monkeypatch.setattr(cls, "_run", run_then_disarm)
    res = atk(rec, x, y, **kw)
    return res, rec.calls


# -- the oracle ---------------------------------------------------------------------------------------------------
def _oracle(trained, kind="score", budget=3):
    model, x, y = trained
    ctx = Context(model, x[:4], y[:4], None, SampleRNG(sample_keys(0, torch.arange(4))))
    return ctx, QueryOracle(ctx, kind, budget)


def test_oracle_charges_each_row_to_its_sample(trained):
    ctx, oracle = _oracle(trained)
    x = ctx.x
    oracle.scores(torch.stack([x[0], x[0], x[2]]), torch.tensor([0, 0, 2]))
    assert ctx.queries.tolist() == [2, 0, 1, 0]
    assert oracle.remaining(torch.arange(4)).tolist() == [1, 3, 2, 3]


def test_oracle_refuses_to_overspend_before_running_the_model(trained):
    model, _, _ = trained
    ctx, oracle = _oracle(trained, budget=3)
    rec = Recorder(model)
    ctx.model = rec
    oracle.labels(ctx.x[[1, 1]], torch.tensor([1, 1]))
    with pytest.raises(QueryBudgetError, match="over the budget of 3"):
        oracle.labels(ctx.x[[1, 1]], torch.tensor([1, 1]))
    assert ctx.queries.tolist() == [0, 2, 0, 0] and len(rec.calls) == 1


def test_decision_oracle_gives_labels_never_scores(trained):
    ctx, oracle = _oracle(trained, kind="decision")
    with pytest.raises(ScoresUnavailableError, match="sees only labels"):
        oracle.scores(ctx.x[:1], torch.tensor([0]))
    assert ctx.queries.sum() == 0
    labels = oracle.labels(ctx.x, torch.arange(4))
    assert labels.dtype == torch.long and labels.shape == (4,)


def test_oracle_takes_images_only(trained):
    ctx, oracle = _oracle(trained)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracle.scores(ctx.x[:1] + 2, torch.tensor([0]))


def test_oracle_never_returns_a_graph(trained):
    ctx, oracle = _oracle(trained)
    out = oracle.scores(ctx.x[:2].clone().requires_grad_(True), torch.tensor([0, 1]))
    assert not out.requires_grad


# -- every black-box attack ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BLACK_BOX)
def test_no_gradient_is_ever_used(name, trained):
    model, x, y = trained
    res = build(name, max_queries=200)(NoGradModel(model).eval(), x[:16], y[:16], generator=gen())
    assert res.gradients.sum() == 0 and res.success.any()


@pytest.mark.parametrize("name", BLACK_BOX)
def test_queries_are_what_the_model_saw_and_stay_within_budget(name, trained, monkeypatch):
    model, x, y = trained
    budget = 150
    res, calls = run_recorded(monkeypatch, build(name, max_queries=budget), model, x[:24], y[:24], generator=gen())
    assert sum(c.shape[0] for c in calls) == int(res.queries.sum()), "the model saw other rows than were counted"
    assert res.queries.max() <= budget
    assert (res.queries >= 1).all()


def coded(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with a distinct binary code in its first row (pixels at 0 or 1), so any two images differ by 1 in Linf;
    labels are the model's own predictions."""
    n, w = x.shape[0], x.shape[-1]
    bits = (torch.arange(n)[:, None] >> torch.arange(w)[None, :]) & 1
    assert n < 2 ** w
    x = x.clone()
    x[:, :, 0, :] = bits[:, None, :].float()
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("name", SCORE)
def test_each_query_is_charged_to_its_own_sample_and_fooled_samples_stop(name, trained, monkeypatch):
    """Under Linf every query of sample i lies within eps (+ the estimators' sigma) of x_i, and the coded test images
    are 1 apart, so each row the model saw can be attributed to one sample and counted."""
    model, x, _ = trained
    x, y = coded(model, x[:32])
    eps = 0.25
    reach = eps + 0.01 + 1e-6  # sigma <= 0.01 for NES/SPSA
    res, calls = run_recorded(monkeypatch, build(name, eps=eps, max_queries=200), model, x, y, generator=gen())

    seen = torch.zeros(len(x), dtype=torch.long)
    last_call = torch.full((len(x),), -1)
    first_fooled = torch.full((len(x),), -1)
    for c, rows in enumerate(calls):
        dist = (rows[:, None] - x[None]).flatten(2).abs().amax(dim=2)
        owner = dist.argmin(dim=1)
        assert (dist.min(dim=1).values <= reach).all(), "a query left its sample's eps-ball"
        seen += torch.bincount(owner, minlength=len(x))
        last_call[owner] = c
        with torch.no_grad():
            fooled = owner[model(rows).argmax(1) != y[owner]]
        first_fooled[fooled[first_fooled[fooled] < 0]] = c
    assert torch.equal(seen, res.queries)
    hit = first_fooled >= 0
    assert torch.equal(first_fooled[hit], last_call[hit]), "a sample was queried after a call that fooled it"
    assert res.success[hit].all() and res.success.sum() >= 4


@pytest.mark.parametrize("name", BLACK_BOX)
def test_a_samples_result_does_not_depend_on_its_batch(name, trained):
    """With per-sample seeds, each image gets the same result and spends the same queries alone or in a batch."""
    model, x, y = trained
    atk = build(name, max_queries=150)
    keys = sample_keys(5, torch.arange(24))
    whole = atk(model, x[:24], y[:24], generator=keys)
    part = atk(model, x[10:15], y[10:15], generator=keys[10:15])
    assert torch.equal(whole.x_adv[10:15], part.x_adv) and torch.equal(whole.queries[10:15], part.queries)


@pytest.mark.parametrize("name", BLACK_BOX)
def test_the_size_of_model_calls_changes_neither_results_nor_counts(name, trained, monkeypatch):
    """rows_per_call splits the oracle's queries into smaller model calls: same images, same queries, same result,
    and it is not part of the attack's config (reports and per-sample streams are keyed by the config)."""
    model, x, y = trained
    keys = sample_keys(3, torch.arange(12))
    big = build(name, max_queries=120)
    small = build(name, max_queries=120, rows_per_call=5)
    a, big_calls = run_recorded(monkeypatch, big, model, x[:12], y[:12], generator=keys)
    b, calls = run_recorded(monkeypatch, small, model, x[:12], y[:12], generator=keys)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries) and torch.equal(a.success, b.success)
    assert big.config() == small.config() and "rows_per_call" not in small.config()
    assert sum(c.shape[0] for c in calls) == sum(c.shape[0] for c in big_calls)  # the same rows ...
    assert len(calls) > len(big_calls)  # ... in more, smaller calls


@pytest.mark.parametrize("name", SCORE)
def test_refilling_the_work_set_changes_nothing_but_the_calls(name, trained, monkeypatch):
    """A work set smaller than the batch is refilled as samples finish: each sample runs its own schedule from its
    own first iteration, so it gets the same result for the same queries; model calls never exceed the work set."""
    model, x, y = trained
    keys = sample_keys(4, torch.arange(20))
    whole = build(name, max_queries=120)(model, x[:20], y[:20], generator=keys)
    small = build(name, max_queries=120, work_set=3)
    res, calls = run_recorded(monkeypatch, small, model, x[:20], y[:20], generator=keys)
    assert torch.equal(whole.x_adv, res.x_adv) and torch.equal(whole.queries, res.queries)
    assert torch.equal(whole.success, res.success) and whole.success.any()
    assert whole.queries.unique().numel() > 3  # samples finish at different times: the refill really happened
    assert "work_set" not in small.config()
    rows_per_sample = getattr(small, "samples", 1)  # the estimators query all their probes in one call
    assert max(c.shape[0] for c in calls) <= 3 * rows_per_sample
    assert calls[0].shape[0] == 3 and sum(c.shape[0] for c in calls) == int(res.queries.sum())


def test_evaluate_hands_a_score_attack_many_batches_per_call(trained):
    """The score attacks keep their own work set full, so a stage hands them many batches at once: the slow tail
    of a few hard samples comes once per call, not once per batch. White-box attacks still get one batch."""
    from attacks.evaluate import run_stage

    model, x, y = trained
    for atk, first_call in ((build("square", max_queries=30), 20), (attacks.PGD(eps=0.1, steps=2), 4)):
        rec = Recorder(model).eval()
        stage = run_stage(rec, x[:20], y[:20], torch.arange(20), atk, atk.name, batch_size=4,
                          device=torch.device("cpu"), seed=0)
        assert rec.calls[0].shape[0] == first_call and stage.stats.seen == 20


def test_row_chunks_cut_only_between_samples():
    from attacks.oracle import row_chunks

    idx = torch.tensor([0, 0, 1, 2, 2, 2, 2, 2, 2, 3, 4, 4])
    chunks = row_chunks(idx, 4)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(idx)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, nothing lost
    for a, b in chunks:
        assert a == 0 or idx[a] != idx[a - 1]  # a cut never splits one sample's rows
        assert b - a <= 4 or len(set(idx[a:b].tolist())) == 1  # longer only for one sample's own rows
    assert (2, 3) in chunks or any(a <= 2 < b for a, b in chunks)
    assert row_chunks(idx, 100) == [(0, len(idx))]


def _rescaled(model: nn.Module) -> nn.Module:
    """Same top label as ``model`` on every input, different scores (a positive per-row scale and shift)."""

    class Rescaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            z = self.inner(x)
            flat = x.flatten(1)
            return z * (1 + 20 * flat.std(dim=1, keepdim=True)) + 5 * flat.sum(dim=1, keepdim=True)

    return Rescaled().eval()


@pytest.mark.parametrize("name", DECISION)
def test_decision_attacks_see_only_the_label(name, trained):
    """Any change of the scores that keeps the top label leaves a decision attack's run exactly the same."""
    model, x, y = trained
    atk = build(name, max_queries=200)
    a = atk(model, x[:16], y[:16], generator=gen(3))
    b = atk(_rescaled(model), x[:16], y[:16], generator=gen(3))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)


def test_the_rescaled_model_does_change_what_a_score_attack_sees(trained):
    model, x, y = trained
    atk = build("square", eps=0.1, max_queries=200)
    a = atk(model, x[:16], y[:16], generator=gen(3))
    b = atk(_rescaled(model), x[:16], y[:16], generator=gen(3))
    assert not torch.equal(a.x_adv, b.x_adv)


@pytest.mark.parametrize("name", DECISION)
def test_decision_attacks_shrink_the_perturbation_with_more_queries(name, trained):
    model, x, y = trained
    few = build(name, max_queries=40)(model, x[:24], y[:24], generator=gen())
    many = build(name, max_queries=600)(model, x[:24], y[:24], generator=gen())
    both = few.success & many.success
    assert both.sum() >= 12
    assert many.norms[both].median() < 0.8 * few.norms[both].median()


@pytest.mark.parametrize("name", DECISION)
def test_decision_attacks_stop_once_within_eps(name, trained):
    model, x, y = trained
    unbounded = build(name, max_queries=300)(model, x[:24], y[:24], generator=gen())
    eps = float(unbounded.norms[unbounded.success].median()) * 1.5
    res = build(name, eps=eps, max_queries=300)(model, x[:24], y[:24], generator=gen())
    assert (res.norms[res.success] <= eps * (1 + 1e-5)).all()
    assert res.success.float().mean() >= 0.5
    assert res.queries[res.success].float().mean() < 300, "successful samples kept querying"


class Constant(nn.Module):
    """Predicts class 0 whatever the input: no label can be changed."""

    def forward(self, x):
        return torch.zeros(x.shape[0], 3, device=x.device).index_fill_(1, torch.tensor([0]), 1.0)


@pytest.mark.parametrize("name", BLACK_BOX)
def test_a_model_that_cannot_be_fooled_is_reported_unfooled(name):
    """No sample is fooled and none finds an adversarial start: a decision attack hands back the input itself."""
    x = torch.rand(5, 1, 8, 8)
    y = torch.zeros(5, dtype=torch.long)
    atk = build(name, max_queries=50)
    res = atk(Constant().eval(), x, y, generator=gen())
    assert not res.success.any()
    assert (res.queries <= 50).all()
    if name in DECISION:
        assert torch.equal(res.x_adv, x)
    else:
        assert (res.norms <= atk.eps * (1 + 1e-6)).all()


@pytest.mark.parametrize("name", SCORE)
def test_more_queries_fool_at_least_as_many(name, trained):
    model, x, y = trained
    few = build(name, eps=0.25, max_queries=30)(model, x, y, generator=gen())
    many = build(name, eps=0.25, max_queries=400)(model, x, y, generator=gen())
    assert many.success.sum() > few.success.sum()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_beats_uniform_noise_of_the_same_size(norm, trained):
    model, x, y = trained
    eps = 0.2 if norm == "linf" else 1.6
    res = attacks.Square(eps=eps, norm=norm, max_queries=300)(model, x, y, generator=gen())
    idx = torch.arange(len(x))
    noise = get_norm(norm).random(SampleRNG(sample_keys(0, idx)), idx, x.shape[1:], eps)
    with torch.no_grad():
        noise_rate = (model((x + noise).clamp(0, 1)).argmax(1) != y).float().mean()
    assert res.success.float().mean() >= noise_rate + 0.3


@pytest.mark.parametrize("basis", ["pixel", "dct"])
def test_simba_bases(basis, trained):
    model, x, y = trained
    res = attacks.SimBA(eps=0.25, basis=basis, max_queries=300)(model, x, y, generator=gen())
    assert res.success.float().mean() >= 0.5


def test_square_schedule_is_the_papers():
    assert p_schedule(0.05, 0, 10000) == 0.05 and p_schedule(0.05, 10, 10000) == 0.05
    assert p_schedule(0.05, 11, 10000) == 0.025
    assert p_schedule(0.05, 600, 10000) == 0.05 / 16
    assert p_schedule(0.05, 9999, 10000) == 0.05 / 512
    assert p_schedule(0.05, 60, 1000) == 0.05 / 16  # rescaled to the budget


def test_dct_basis_is_orthonormal():
    m = dct_matrix(7)
    assert torch.allclose(m @ m.T, torch.eye(7), atol=1e-5)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [(n, {"max_queries": 0}, "max_queries must be >= 1") for n in BLACK_BOX]
    + [(n, {"max_queries": -5}, "max_queries must be >= 1") for n in BLACK_BOX]
    + [(n, {"eps": 0.0}, "eps must be > 0") for n in BLACK_BOX]
    + [(n, {"eps": -0.1}, "eps must be >=? 0") for n in BLACK_BOX]
    + [(n, {"eps": 1.5}, "eps must be <= 1") for n in SCORE]
    + [
        ("hopskipjump", {"norm": "linf", "eps": 1.5}, "eps must be <= 1"),
        ("boundary", {"norm": "linf"}, "does not support norm"),
        ("square", {"p_init": 0.0}, "p_init must be > 0"),
        ("square", {"loss": "prob"}, "loss must be one of"),
        ("simba", {"basis": "wavelet"}, "basis must be one of"),
        ("nes", {"samples": 7}, "samples must be even"),
        ("spsa", {"sigma": 0.0}, "sigma must be > 0"),
        ("hopskipjump", {"max_evals": 10, "init_evals": 100}, "max_evals must be >= 100"),
        ("boundary", {"source_step": 1.0}, "source_step must be < 1"),
        ("boundary", {"step_adaptation": 1.0}, "step_adaptation must be > 1"),
        ("hopskipjump", {"loss": "ce"}, "does not take loss"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.build(name, **kwargs)


def test_decision_attacks_have_no_targeted_mode_and_score_attacks_do():
    assert all(not attacks.get(n).targeted for n in DECISION)
    assert all(attacks.get(n).targeted for n in SCORE)
    assert set(SCORE) == {"square", "simba", "nes", "spsa"} and set(DECISION) == {"hopskipjump", "boundary"}


def test_default_work_set_spans_several_model_calls():
    """The default work set holds at least MIN_WORK_SET samples (several CPU model calls' worth), at least one
    call's rows when calls are larger, and fewer only when the images are too large for its memory bound."""
    from attacks.blackbox import MIN_WORK_SET, WORK_SET_BYTES, default_work_set

    small = torch.zeros(1, 1, 28, 28)
    assert default_work_set(small, 128) == MIN_WORK_SET
    assert default_work_set(small, 4 * MIN_WORK_SET) == 4 * MIN_WORK_SET
    huge = torch.zeros(1, 3, 1024, 1024)
    assert default_work_set(huge, 128) == WORK_SET_BYTES // (huge.numel() * 4 * 8) < MIN_WORK_SET


def test_random_streams_match_splitmix64():
    """The per-sample streams hash with the SplitMix64 finalizer, bit for bit (seeded results depend on it): checked
    against a plain-Python SplitMix64 on edge and random 64-bit values, the input left untouched."""
    from attacks.rng import _mix

    def splitmix(v: int) -> int:
        m = (1 << 64) - 1
        v &= m
        v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & m
        v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & m
        v ^= v >> 31
        return v - (1 << 64) if v >= 1 << 63 else v

    values = [0, 1, -1, -(1 << 63), (1 << 63) - 1] + torch.randint(-(1 << 62), 1 << 62, (50,),
                                                                      generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.tensor(values, dtype=torch.long)
    before = x.clone()
    assert _mix(x).tolist() == [splitmix(v) for v in values]
    assert torch.equal(x, before)
