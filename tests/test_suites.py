"""Named suites: the default (adaptive) suite's escalation, exact pass counts, and suite errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attacks
from attacks.suites import SUITES, Entry, Escalation


class Counting(nn.Module):
    """Counts images through the model and input gradients flowing back, independently of the attacks' own books."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.fwd, self.bwd = inner, 0, 0

    def _back(self, grad):
        self.bwd += grad.shape[0]

    def forward(self, x):
        out = self.inner(x)
        self.fwd += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._back)
        return out


class Rounded(nn.Module):
    """The model on inputs rounded to 1/64: predictions barely change, every input gradient is exactly zero
    (masked gradients)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 64) / 64)


def test_default_suite_is_named_and_built():
    assert attacks.DEFAULT_SUITE in attacks.SUITES
    built = attacks.build_suite(attacks.DEFAULT_SUITE, eps=0.1)
    assert [a.name for a in built] == [e.attack for e in SUITES[attacks.DEFAULT_SUITE]]
    assert [isinstance(a, Escalation) for a in built] == \
        [e.escalation is not None for e in SUITES[attacks.DEFAULT_SUITE]]
    esc = next(a for a in built if isinstance(a, Escalation))
    # the escalation is its attack in every way that decides results: same configuration, hence same streams
    assert esc.config() == esc.attack.config() and esc.eps == 0.1 and esc.kind == esc.attack.kind
    assert "apgd-t(n_target_classes=3, rank=distance)" in attacks.describe_suite("adaptive")


def test_escalation_is_skipped_when_the_attack_before_fooled_none(trained):
    model, x, y = trained
    counted = Counting(model)
    never = attacks.PGD(eps=1e-4, steps=1)  # far too small a budget to fool anything
    later = Escalation(attacks.PGD(eps=0.15, steps=5))
    rep = attacks.evaluate(counted, (x, y), [never, later], batch_size=16, seed=0)
    st = rep.per_attack["pgd#2"]
    assert rep.per_attack["pgd"].successes == 0
    assert st.skipped and st.seen == 0 and st.forward_passes == st.backward_passes == 0
    assert rep.robust_accuracy == rep.clean_accuracy
    assert rep.passes == {"forward": counted.fwd, "backward": counted.bwd}


def test_escalation_runs_after_a_success_and_matches_its_attack_alone(trained):
    model, x, y = trained
    probe = attacks.PGD(eps=0.15, steps=2)
    full = attacks.PGD(eps=0.15, steps=4)
    escalated = attacks.evaluate(model, (x, y), [probe, Escalation(full)], batch_size=16, seed=4)
    plain = attacks.evaluate(model, (x, y), [probe, full], batch_size=16, seed=4)
    assert escalated.per_attack["pgd"].successes > 0
    assert not escalated.per_attack["pgd#2"].skipped and escalated.per_attack["pgd#2"].seen > 0
    assert torch.equal(escalated.robust, plain.robust) and torch.equal(escalated.fooled_by, plain.fooled_by)
    assert escalated.passes == plain.passes


def test_escalation_needs_its_rate(trained):
    """An escalation with ``min_rate`` runs only when the attack before it fooled that fraction of what it saw."""
    model, x, y = trained
    probe = attacks.PGD(eps=0.15, steps=2)
    rep = attacks.evaluate(model, (x, y), [probe, Escalation(attacks.PGD(eps=0.15, steps=4), min_rate=0.99)],
                           batch_size=16, seed=4)
    rate = rep.per_attack["pgd"].success_rate
    assert 0 < rate < 0.99 and rep.per_attack["pgd#2"].skipped
    rep = attacks.evaluate(model, (x, y), [probe, Escalation(attacks.PGD(eps=0.15, steps=4), min_rate=rate)],
                           batch_size=16, seed=4)
    assert not rep.per_attack["pgd#2"].skipped


def test_targeted_apgd_starts_at_the_rank_it_is_given(trained):
    """The blobs have 4 classes, so 3 wrong ones: from the 4th there is nothing left to aim at (no pass spent);
    from the 2nd there is."""
    model, x, y = trained
    none = attacks.evaluate(model, (x, y), [attacks.APGDT(eps=0.15, steps=5, first_target=4)], seed=0)
    assert none.per_attack["apgd-t"].successes == 0 and none.per_attack["apgd-t"].backward_passes == 0
    later = attacks.evaluate(model, (x, y), [attacks.APGDT(eps=0.15, steps=5, first_target=2, n_target_classes=2)],
                             seed=0)
    assert later.per_attack["apgd-t"].backward_passes > 0 and later.robust_accuracy < later.clean_accuracy


def test_passes_are_exact(trained):
    """The report's passes are every image through the model and every input gradient, as counted outside."""
    model, x, y = trained
    counted = Counting(model)
    suite = [attacks.FGSM(eps=0.1), attacks.APGD(eps=0.1, steps=5), attacks.Square(eps=0.1, max_queries=30)]
    rep = attacks.evaluate(counted, (x, y), suite, batch_size=16, seed=1)
    assert rep.passes == {"forward": counted.fwd, "backward": counted.bwd}
    assert rep.passes["backward"] > 0 and rep.per_attack["square"].backward_passes == 0
    assert rep.to_dict()["passes"] == rep.passes
    assert rep.to_dict()["attacks"]["apgd"]["forward_passes"] == sum(rep.per_attack["apgd"].queries)


@pytest.mark.filterwarnings("ignore:the loss gradient is exactly zero")
def test_default_suite_escalates_on_masked_gradients(trained):
    """Gradients masked to zero: the gradient stages fool nothing, the short black-box probe does (which would call
    in the full Square for any sample left), and the default suite reaches what the standard suite reaches."""
    model, x, y = trained
    masked, data = Rounded(model), (x[:20], y[:20])
    adaptive = attacks.evaluate(masked, data, attacks.build_suite("adaptive", eps=0.2), batch_size=32, seed=0)
    standard = attacks.evaluate(masked, data, attacks.build_suite("standard", eps=0.2), batch_size=32, seed=0)
    st = adaptive.per_attack
    assert st["apgd"].successes == 0 and st["apgd-t"].successes == 0  # the gradients say nothing
    assert st["square"].successes > 0 and not st["square#2"].skipped
    assert (st["apgd"].backward_passes > 0) and standard.per_attack["square"].successes > 0
    assert adaptive.robust_accuracy <= standard.robust_accuracy < adaptive.clean_accuracy


def test_a_suite_that_cannot_run_under_a_norm_names_the_attack(monkeypatch):
    monkeypatch.setitem(SUITES, "l2only", [Entry("apgd"), Entry("boundary")])
    with pytest.raises(ValueError, match="boundary supports only l2"):
        attacks.build_suite("l2only", eps=0.1, norm="linf")
    with pytest.raises(ValueError, match="unknown suite 'nope': choose one of adaptive"):
        attacks.build_suite("nope", eps=0.1)


@pytest.mark.parametrize("norm, dual", [("linf", 1), ("l2", 2)])
def test_distance_ranking_is_exact_on_a_linear_model(norm, dual):
    """On a linear model the linearized distance to each class's boundary is the true one: margin over the dual norm
    of the weight difference. APGD-T's ``rank="distance"`` must aim at the classes in exactly that order."""
    from attacks.base import Context, _make_rng

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    x, y = torch.rand(10, 1, 8, 8), torch.randint(0, 6, (10,))
    with torch.no_grad():
        z, w = lin(x), lin[1].weight
    gap = z.gather(1, y[:, None]) - z
    size = torch.linalg.vector_norm(w[y][:, None, :] - w[None], ord=dual, dim=2)
    dist = gap / size.clamp_min(1e-12)
    dist[torch.arange(10), y] = float("inf")
    expected = dist.argsort(dim=1)[:, :5]
    atk = attacks.APGDT(eps=0.1, norm=norm, rank="distance")
    ctx = Context(lin, x, y, None, _make_rng(None, x))
    clean, order = atk._ranked(ctx, torch.arange(10))
    assert torch.equal(order, expected) and torch.allclose(clean, z)
    assert int(ctx.gradients.min()) == 6  # one input gradient per class, charged to every sample
    _, by_logit = attacks.APGDT(eps=0.1, norm=norm)._ranked(Context(lin, x, y, None, _make_rng(None, x)),
                                                           torch.arange(10))
    assert not torch.equal(by_logit, order)  # the two rankings differ on this model, so the test tells them apart


def test_cli_lists_the_suites_and_refuses_an_unknown_one(tmp_path, monkeypatch):
    from train_fixtures import run_cli

    monkeypatch.setenv("COLUMNS", "250")
    listed = run_cli("attacks")
    assert listed.exit_code == 0 and f"{attacks.DEFAULT_SUITE} (default)" in listed.stdout
    assert all(name in listed.stdout for name in attacks.SUITES)
    bad = run_cli("report", "--suite", "nope", "--checkpoint", str(tmp_path / "none.pt"))
    assert bad.exit_code == 2 and "unknown suite 'nope': choose one of adaptive, quick, standard, full" in bad.stderr
