"""attacks.evaluate: the cascade, the per-sample worst case, bookkeeping and sanity warnings."""

from __future__ import annotations

import json

import pytest
import torch

import attacks


def test_worst_case_is_at_most_every_single_attack(trained):
    model, x, y = trained
    suite = [attacks.FGSM(eps=0.15), attacks.PGD(eps=0.15, steps=10), attacks.APGD(eps=0.15, steps=10, loss="dlr")]
    rep = attacks.evaluate(model, (x, y), suite, batch_size=16, seed=0)
    singles = [attacks.evaluate(model, (x, y), [a], batch_size=16, seed=0).robust_accuracy for a in suite]
    assert rep.robust_accuracy <= min(singles) + 1e-9
    assert rep.robust_accuracy < rep.clean_accuracy
    # cascade: each attack sees exactly the samples that survived the previous ones
    seen = [s.seen for s in rep.per_attack.values()]
    assert seen[0] == int(rep.clean_correct.sum())
    assert seen[1] == seen[0] - rep.per_attack["fgsm"].successes
    assert int((rep.fooled_by >= 0).sum()) == sum(s.successes for s in rep.per_attack.values())
    assert torch.equal(rep.robust, rep.clean_correct & (rep.fooled_by < 0))
    pgd = rep.per_attack["pgd"]
    assert len(pgd.success_queries) == pgd.successes > 0
    assert min(pgd.queries) <= pgd.queries_median_success <= max(pgd.queries)


def test_cascade_resumed_from_finished_stages_ends_as_one_run(trained):
    """``cascade`` with the first attack's result given as finished skips that attack and ends exactly where the
    uninterrupted cascade ends; ``on_stage`` sees every attack it ran, and evaluate is that cascade."""
    from attacks.evaluate import cascade, correctly_classified

    model, x, y = trained
    suite = [attacks.FGSM(eps=0.15), attacks.PGD(eps=0.15, steps=5)]
    run = dict(names=["fgsm", "pgd"], batch_size=16, device=torch.device("cpu"), seed=2)
    clean = correctly_classified(model, x, y, batch_size=16, device=torch.device("cpu"))
    ran = {}
    whole = cascade(model, x, y, suite, start=clean, on_stage=lambda i, st: ran.setdefault(i, st), **run)
    assert sorted(ran) == [0, 1] and torch.equal(ran[1].idx, (clean & (whole.fooled_by != 0)).nonzero()[:, 0])
    later = []
    resumed = cascade(model, x, y, suite, start=clean, finished={0: ran[0].idx[ran[0].fooled]},
                      on_stage=lambda i, st: later.append(i), **run)
    assert later == [1]
    assert torch.equal(resumed.robust, whole.robust) and torch.equal(resumed.fooled_by, whole.fooled_by)
    rep = attacks.evaluate(model, (x, y), suite, batch_size=16, seed=2)
    assert torch.equal(rep.robust, whole.robust) and torch.equal(rep.fooled_by, whole.fooled_by)
    assert 0 < int((whole.fooled_by == 1).sum()) and whole.robust.sum() < clean.sum()


def test_same_seed_same_report(trained):
    model, x, y = trained
    suite = [attacks.PGD(eps=0.15, steps=5)]
    a = attacks.evaluate(model, (x, y), suite, batch_size=16, seed=3)
    b = attacks.evaluate(model, (x, y), suite, batch_size=16, seed=3)
    assert torch.equal(a.robust, b.robust) and torch.equal(a.queries, b.queries)
    assert 0 < a.robust_accuracy < a.clean_accuracy  # a budget where the outcome is not trivial


def test_model_mode_restored_and_examples_valid(trained):
    model, x, y = trained
    model.train()
    try:
        rep = attacks.evaluate(model, (x, y), [attacks.PGD(eps=0.15, steps=5)], keep_examples=True)
        assert model.training
    finally:
        model.eval()
    fooled = rep.fooled_by >= 0
    with torch.no_grad():
        assert (model(rep.x_adv[fooled]).argmax(1) != y[fooled]).all()
    assert torch.equal(rep.x_adv[~fooled], x[~fooled])
    assert fooled.any() and (rep.x_adv - x).abs().amax() <= 0.15 + 1e-6


def test_report_is_json_ready(trained):
    model, x, y = trained
    rep = attacks.evaluate(model, (x[:20], y[:20]), [attacks.FGSM(eps=0.1)])
    doc = json.loads(json.dumps(rep.to_dict(per_sample=True), allow_nan=True))
    assert doc["config"]["seed"] == 0 and "torch" in doc["config"]["versions"]
    assert len(doc["per_sample"]["robust"]) == 20
    assert doc["attacks"]["fgsm"]["seen"] == int(rep.clean_correct.sum())


def test_uint8_data_and_batches_iterable(trained):
    model, x, y = trained
    xu = (x * 255).round().to(torch.uint8)
    rep1 = attacks.evaluate(model, (xu, y), [attacks.FGSM(eps=0.1)])
    rep2 = attacks.evaluate(model, [(xu[:30], y[:30]), (xu[30:], y[30:])], [attacks.FGSM(eps=0.1)])
    assert rep1.robust_accuracy == rep2.robust_accuracy and rep1.n == 64


def test_targeted_evaluation_counts_target_hits(trained):
    model, x, y = trained
    t = (y + 1) % 4
    rep = attacks.evaluate(model, (x, y), [attacks.PGD(eps=0.3, steps=10)], target=t, keep_examples=True)
    hit = rep.fooled_by >= 0
    with torch.no_grad():
        assert torch.equal(model(rep.x_adv[hit]).argmax(1), t[hit])
    assert rep.config["targeted"]


def test_sanity_warnings_flag_softmax_outputs(trained):
    model, x, y = trained
    soft = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="probabilities"):
        rep = attacks.evaluate(soft, (x, y), [attacks.FGSM(eps=0.05)])
    assert any("probabilities" in w for w in rep.warnings)


def test_device_mismatch_is_refused(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="move it"):
        attacks.evaluate(model, (x, y), [attacks.FGSM()], device="meta")


def test_outcomes_do_not_depend_on_batching_or_cascade_position(trained):
    model, x, y = trained
    pgd = attacks.PGD(eps=0.14, steps=5)
    small = attacks.evaluate(model, (x, y), [pgd], batch_size=7, seed=5)
    large = attacks.evaluate(model, (x, y), [pgd], batch_size=64, seed=5)
    assert 0 < small.robust_accuracy < small.clean_accuracy
    assert torch.equal(small.robust, large.robust)
    # inside a cascade, PGD meets each surviving sample with the same random start as when it runs alone
    cascade = attacks.evaluate(model, (x, y), [attacks.FGSM(eps=0.14), pgd], batch_size=16, seed=5)
    assert not (cascade.robust & ~small.robust).any()
