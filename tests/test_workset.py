"""The work set of samples still under attack, its results store, and the shared Adam rule."""

from __future__ import annotations

import pytest
import torch

from attacks.optim import Adam
from attacks.workset import Results, WorkSet


def test_retire_records_results_and_compacts_every_field():
    x = torch.arange(5.0)[:, None].repeat(1, 3)
    work = WorkSet.batch(x, cur=x + 10, box=(x - 1, x + 1), velocity=None)
    logits = torch.arange(10.0).reshape(5, 2)
    done = torch.tensor([False, True, False, True, False])
    work.retire(done, work.cur, logits, fooled=done)
    assert work.ids.tolist() == [0, 2, 4] and len(work) == 3
    assert torch.equal(work.cur, x[[0, 2, 4]] + 10)
    assert torch.equal(work.box[0], x[[0, 2, 4]] - 1) and torch.equal(work.box[1], x[[0, 2, 4]] + 1)
    assert work.velocity is None
    res = work.results
    assert torch.equal(res.x_adv[[1, 3]], x[[1, 3]] + 10) and torch.equal(res.x_adv[[0, 2, 4]], x[[0, 2, 4]])
    assert torch.equal(res.logits[[1, 3]], logits[[1, 3]]) and res.fooled.tolist() == done.tolist()
    assert torch.equal(x, torch.arange(5.0)[:, None].repeat(1, 3)), "the clean input is never written"
    work.retire_all(work.cur, logits[:3])
    assert work.empty and torch.equal(res.x_adv, x + 10) and torch.equal(res.logits[[0, 2, 4]], logits[:3])


def test_nothing_retired_leaves_results_untouched():
    x = torch.rand(4, 2)
    work = WorkSet.batch(x, cur=x.clone())
    work.retire(torch.zeros(4, dtype=torch.bool), work.cur)
    assert len(work) == 4 and not work.results.recorded and work.results.x_adv is x and work.results.logits is None


def test_ids_follow_the_results_rows_and_join_admits_samples():
    idx = torch.tensor([7, 3, 9, 4])
    res = Results(torch.zeros(4, 2), ids=idx)
    work = WorkSet(res, torch.tensor([0, 1]), v=torch.tensor([1.0, 2.0]))
    assert work.ids.tolist() == [7, 3]
    work.join(WorkSet(res, torch.tensor([2, 3]), v=torch.tensor([3.0, 4.0])))
    assert work.pos.tolist() == [0, 1, 2, 3] and work.ids.tolist() == [7, 3, 9, 4] and work.v.tolist() == [1, 2, 3, 4]
    work.keep(torch.tensor([True, False, False, True]))
    assert work.ids.tolist() == [7, 4] and work.v.tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="different fields"):
        work.join(WorkSet(res, torch.tensor([1]), w=torch.tensor([0.0])))
    with pytest.raises(ValueError, match="same results"):
        work.join(WorkSet(Results(torch.zeros(4, 2)), torch.tensor([1]), v=torch.tensor([0.0])))


def test_unknown_and_managed_fields_are_refused():
    work = WorkSet.batch(torch.zeros(2, 1))
    with pytest.raises(AttributeError, match="no field 'cur'"):
        _ = work.cur
    with pytest.raises(AttributeError, match="managed"):
        work.ids = torch.tensor([0])


def _reference_adam(w, grads, lr):
    """Adam written out by hand, as the attacks stepped it."""
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for it, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - lr * (m / (1 - 0.9**it)) / ((v / (1 - 0.999**it)).sqrt() + 1e-8)
    return w


def test_adam_matches_the_hand_written_rule_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=gen)
    grads = [torch.randn(6, 5, generator=gen) * 10 ** k for k in range(-3, 3)]
    adam = Adam(0.01)
    w, moments = w0.clone(), Adam.moments(w0)
    for it, g in enumerate(grads, start=1):
        move, moments = adam.step(moments, g, it)
        w = w - move
    assert torch.equal(w, _reference_adam(w0, grads, 0.01))
    # per-sample counts that all agree give the same steps as one count
    w2, moments = w0.clone(), Adam.moments(w0)
    for it, g in enumerate(grads, start=1):
        move, moments = adam.step(moments, g, torch.full((6,), it))
        w2 = w2 - move
    assert torch.allclose(w2, w, rtol=0, atol=1e-6)


def test_adam_first_step_is_lr_times_the_sign():
    move, _ = Adam(0.5).step(Adam.moments(torch.zeros(3)), torch.tensor([2.0, -3.0, 0.5]), 1)
    assert torch.allclose(move, torch.tensor([0.5, -0.5, 0.5]), atol=1e-6)
