"""Patch and pixel attacks: contract properties, budgets (k pixels, patch footprint), batching, bad input.

Everything runs on a tiny CNN trained in about a second on synthetic 16x16 images whose class is the quadrant
holding a bright blob, so the attacks have a real decision boundary to cross.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image
from torch import nn

import attacks
from attacks.greedyl0 import corner_proposals
from attacks.geometry import patch_shape, patch_shapes, ranked_windows
from attacks.norms import get_norm
from attacks.patch import eot_paste, noise_patch, paste, patch_footprints, train_patch
from robustcnn.errors import RobustCNNError, UsageError
from robustcnn.patches import load_patch, save_patch
from train_fixtures import assert_one_line_error, run_cli

SIZE = 16


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noise plus one small bright spot in a random quadrant; the quadrant is the label (4 classes).

    The spot is a few pixels wide, so changing a few pixels can move it: pixel attacks have a fair chance."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=g)
    centre = torch.rand(n, 2, generator=g) * 4 + 2 + 8 * torch.stack([y // 2, y % 2], dim=1)
    r = torch.arange(SIZE, dtype=torch.float32)
    d2 = (r[None, :, None] - centre[:, 0, None, None]) ** 2 + (r[None, None, :] - centre[:, 1, None, None]) ** 2
    x = 0.25 + 0.1 * torch.rand(n, SIZE, SIZE, generator=g) + 0.6 * torch.exp(-d2)
    return x.clamp(0, 1)[:, None], y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a second thread thrashes when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    """(model in eval mode, x, y) with x correctly classified test images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    xtr, ytr = _blobs(1024, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        i = torch.arange(step * 64, step * 64 + 64) % 1024
        loss = nn.functional.cross_entropy(model(xtr[i]), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    x, y = _blobs(64, seed=2)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    assert ok.float().mean() > 0.9, "the fixture model did not learn the task"
    return model, x[ok][:24], y[ok][:24]


def _fixed_patch() -> torch.Tensor:
    return noise_patch((1, 4, 4), torch.Generator().manual_seed(5))


ATTACKS = {
    "onepixel": lambda: attacks.OnePixel(pixels=3, population=40, steps=15),
    "greedyl0": lambda: attacks.GreedyL0(pixels=8),
    "patch-trained": lambda: attacks.UniversalPatch(area=0.1, steps=40, lr=0.1),
    "patch-given": lambda: attacks.UniversalPatch(patch=_fixed_patch()),
    "patch-noise": lambda: attacks.UniversalPatch(patch=_fixed_patch(), noise=True),
    "lavan": lambda: attacks.LocalizedPatch(area=0.1, steps=40),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _changed_pixels(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """(N, H, W) mask of the pixels where any channel differs."""
    return (x_adv != x).any(dim=1)


# -- contract ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ATTACKS)
def test_contract(task, name):
    model, x, y = task
    params = [p.clone() for p in model.parameters()]
    x_before = x.clone()
    atk = ATTACKS[name]()
    res = atk(model, x, y, generator=_gen())
    assert torch.equal(x, x_before), "x was modified"
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    assert not model.training and all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert res.queries.dtype == torch.long and (res.queries >= 1).all()
    assert res.norms.shape == (x.shape[0],)
    again = atk(model, x, y, generator=_gen())
    assert torch.equal(again.x_adv, res.x_adv) and torch.equal(again.queries, res.queries)


@pytest.mark.parametrize("name", ["onepixel", "greedyl0", "patch-trained", "lavan"])
def test_accuracy_drops(task, name):
    model, x, y = task
    res = ATTACKS[name]()(model, x, y, generator=_gen())
    assert res.success.float().mean() >= 0.25, f"{name} fooled only {res.success.float().mean():.0%}"


@pytest.mark.parametrize("name", ["onepixel", "greedyl0", "patch-trained", "lavan"])
def test_targeted(task, name):
    model, x, y = task
    target = (y + 1) % 4
    res = ATTACKS[name]()(model, x, y, target=target, generator=_gen())
    with torch.no_grad():
        assert torch.equal(res.success, model(res.x_adv).argmax(1) == target)


def test_registry_kinds():
    assert {"patch", "lavan"} <= set(attacks.available("patch"))
    assert "onepixel" in attacks.available("pixel")
    assert attacks.get("greedyl0").kind == "white-box" and attacks.get("greedyl0").norms == ("l0",)
    assert attacks.get("onepixel").params["pixels"] == 1
    assert attacks.get("lavan").params["area"] == 0.05


# -- pixel budget --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("cls", [attacks.OnePixel, attacks.GreedyL0])
def test_at_most_k_pixels(task, cls, k):
    model, x, y = task
    kwargs = {"population": 30, "steps": 5} if cls is attacks.OnePixel else {}
    res = cls(pixels=k, **kwargs)(model, x, y, generator=_gen())
    count = _changed_pixels(x, res.x_adv).sum(dim=(1, 2))
    assert (count <= k).all()
    assert torch.equal(res.norms, count.float())


def test_all_channels_of_a_pixel_count_as_one():
    x = torch.zeros(2, 3, 5, 5)
    x_adv = x.clone()
    x_adv[0, :, 1, 1] = 0.5  # one pixel, three channels
    x_adv[1, 0, 2, 2] = x_adv[1, 2, 3, 3] = 0.5  # two pixels
    assert get_norm("l0").measure(x_adv - x).tolist() == [1.0, 2.0]
    kept = attacks.OnePixel(pixels=1)._enforce(x, x_adv)
    assert torch.equal(kept[0], x_adv[0]) and _changed_pixels(x, kept)[1].sum() == 1


def test_pixel_enforce_keeps_the_k_largest_changes():
    g = _gen(3)
    x = torch.rand(4, 3, 8, 8, generator=g)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    x_adv[:, :, 2, 5] = 1 - x[:, :, 2, 5].round()  # the two biggest changes of every image
    x_adv[:, :, 6, 1] = 1 - x[:, :, 6, 1].round()
    out = attacks.GreedyL0(pixels=2)._enforce(x, x_adv)
    changed = _changed_pixels(x, out)
    assert changed.sum() == 8 and changed[:, 2, 5].all() and changed[:, 6, 1].all()
    assert torch.equal(out[:, :, 2, 5], x_adv[:, :, 2, 5])


def test_population_evolves_as_one_batch(task):
    """One model call per generation serves every candidate of every image (when ``max_batch`` holds them all);
    chunking changes nothing else."""
    model, x, y = task
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        atk = attacks.OnePixel(pixels=1, population=20, steps=6, max_batch=len(y) * 20)
        whole = atk(model, x, y, generator=_gen())
        n_whole = len(calls)
        calls.clear()
        chunked = attacks.OnePixel(pixels=1, population=20, steps=6, max_batch=37)(model, x, y, generator=_gen())
    finally:
        hook.remove()
    assert n_whole <= 1 + 1 + 6 + 1  # clean check, initial population, generations, referee pass at most
    assert max(calls) <= 37
    assert torch.equal(whole.x_adv, chunked.x_adv) and torch.equal(whole.queries, chunked.queries)
    unfooled = ~whole.success
    assert (whole.queries[unfooled] == 1 + 20 * 7).all()
    assert (whole.queries <= 1 + 20 * 7).all()


def test_query_budget_caps_generations(task):
    model, x, y = task
    res = attacks.OnePixel(pixels=1, population=20, steps=100, max_queries=101)(model, x, y, generator=_gen())
    assert res.queries.max() <= 101


def test_greedy_success_grows_with_pixels(task):
    """Greedy is a prefix of itself: whatever k pixels fool, k + 2 pixels fool too."""
    model, x, y = task
    small = attacks.GreedyL0(pixels=2)(model, x, y).success
    large = attacks.GreedyL0(pixels=4)(model, x, y).success
    assert (large | ~small).all() and large.sum() >= small.sum()



def test_greedy_one_pixel_equals_an_exhaustive_search(task):
    """With every (pixel, black/white) change proposed, one step tries them all: it fools exactly the images that
    some single saturated pixel fools, and otherwise keeps the change with the largest margin loss."""
    model, x, y = task
    n, _, h, w = x.shape
    res = attacks.GreedyL0(pixels=1, candidates=2 * h * w)(model, x, y)
    trials = x.repeat_interleave(2 * h * w, dim=0).reshape(n, 2, h * w, h * w)
    pixel = torch.arange(h * w)
    trials[:, 0, pixel, pixel] = 0.0
    trials[:, 1, pixel, pixel] = 1.0
    with torch.no_grad():
        logits = model(trials.reshape(-1, 1, h, w)).reshape(n, 2 * h * w, -1)
    fools = logits.argmax(-1).ne(y[:, None])
    assert torch.equal(res.success, fools.any(dim=1))
    assert res.success.any() and not res.success.all(), "the fixture should have images of both kinds"
    best = logits.gather(2, y[:, None, None].expand(-1, 2 * h * w, 1))[..., 0]
    best = (logits.scatter(2, y[:, None, None].expand(-1, 2 * h * w, 1), float("-inf")).amax(-1) - best).amax(1)
    with torch.no_grad():
        out = model(res.x_adv)
    kept = out.scatter(1, y[:, None], float("-inf")).amax(1) - out.gather(1, y[:, None])[:, 0]
    assert torch.allclose(kept[~res.success], best[~res.success], atol=1e-5)


def test_greedy_counts_every_proposal_and_chunking_changes_nothing(task):
    model, x, y = task
    res = attacks.GreedyL0(pixels=2, candidates=5)(model, x, y)
    unfooled = ~res.success
    assert unfooled.any() and res.success.any()
    assert (res.queries[unfooled] == 2 * (1 + 5)).all() and (res.gradients[unfooled] == 2).all()
    assert torch.equal(res.queries, res.gradients * (1 + 5)) and torch.equal(res.gradients, res.norms.long())
    chunked = attacks.GreedyL0(pixels=2, candidates=5, max_batch=7)(model, x, y)
    assert torch.equal(chunked.x_adv, res.x_adv) and torch.equal(chunked.queries, res.queries)


def test_corner_proposals_on_colour_images():
    g = _gen(4)
    x0 = torch.rand(3, 3, 5, 5, generator=g)
    cur = x0.clone()
    cur[:, :, 1, 2] = 1.0  # already changed in every image: never proposed again
    grad = torch.randn(x0.shape, generator=g)
    pos, values, valid = corner_proposals(cur, x0, grad, count=60)
    assert pos.shape == (3, 50) and values.shape == (3, 50, 3)  # at most every (pixel, corner) pair
    assert valid[:, :48].all() and not valid[:, 48:].any()  # 2 corners x 24 free pixels, the changed one last
    pos, values = pos[:, :48], values[:, :48]
    assert not (pos == 1 * 5 + 2).any()
    assert ((values == 0) | (values == 1)).all()
    flat, gflat = cur.reshape(3, 3, 25), grad.reshape(3, 3, 25)
    at = lambda t: t.gather(2, pos[:, None].expand(-1, 3, -1)).transpose(1, 2)  # noqa: E731  (3, 48, C)
    gain = (at(gflat) * (values - at(flat))).sum(-1)
    assert (gain[:, :-1] >= gain[:, 1:]).all(), "proposals come best first"
    toward = (at(gflat) > 0).float()
    assert ((values == toward).all(-1) | (values == 1 - toward).all(-1)).all()
    assert corner_proposals(cur, x0, grad, count=1)[1].eq(toward[:, :1]).all()  # candidates=1: the gradient's corner


# -- patch footprint -----------------------------------------------------------------------------------------------
def _bounding_boxes(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(rows, cols) spanned by the changed pixels of each image (0, 0 when none)."""
    out = []
    for m in mask:
        r, c = m.any(dim=1).nonzero(), m.any(dim=0).nonzero()
        out.append((int(r.max() - r.min() + 1), int(c.max() - c.min() + 1)) if r.numel() else (0, 0))
    return out


@pytest.mark.parametrize("name", ["patch-trained", "patch-given", "patch-noise", "lavan"])
def test_nothing_changes_outside_the_patch(task, name):
    model, x, y = task
    atk = ATTACKS[name]()
    res = atk(model, x, y, generator=_gen())
    a, b = atk.footprint(x.shape[1:])
    boxes = _bounding_boxes(_changed_pixels(x, res.x_adv))
    assert all(r <= a and c <= b for r, c in boxes), boxes
    assert torch.allclose(res.norms, torch.full_like(res.norms, a * b / SIZE**2))
    assert (get_norm("area").measure(res.x_adv - x) <= res.norms + 1e-6).all()


def test_given_patch_is_pasted_exactly_at_random_places(task):
    model, x, y = task
    patch = _fixed_patch()
    res = attacks.UniversalPatch(patch=patch)(model, x, y, generator=_gen())
    windows = nn.functional.unfold(res.x_adv, 4).transpose(1, 2)  # every 4x4 window of every image
    hits = (windows == patch.reshape(1, 1, -1)).all(dim=2).any(dim=1)
    assert hits.all()
    other = attacks.UniversalPatch(patch=patch)(model, x, y, generator=_gen(1))
    assert not torch.equal(other.x_adv, res.x_adv)  # locations come from the generator


def test_patch_enforce_keeps_one_window():
    x = torch.zeros(2, 1, 10, 10)
    x_adv = x.clone()
    x_adv[:, :, 2:5, 3:6] = 0.7  # a 3x3 patch ...
    x_adv[:, :, 9, 0] = 0.2  # ... and a stray change far away
    atk = attacks.UniversalPatch(patch=torch.full((1, 3, 3), 0.7))
    out = atk._enforce(x, x_adv)
    assert out[:, :, 9, 0].eq(0).all()
    assert torch.equal(out[:, :, 2:5, 3:6], x_adv[:, :, 2:5, 3:6])


def test_paste_is_exact_and_local():
    x = torch.rand(3, 3, 9, 11, generator=_gen())
    patch = torch.rand(3, 2, 4, generator=_gen(1))
    out = paste(x, patch, torch.tensor([0, 3, 7]), torch.tensor([0, 5, 7]))
    assert torch.equal(out[0, :, 0:2, 0:4], patch) and torch.equal(out[2, :, 7:9, 7:11], patch)
    changed = _changed_pixels(x, out)
    assert changed.sum(dim=(1, 2)).le(8).all()


@pytest.mark.parametrize("rotation,min_scale", [(0.0, 1.0), (30.0, 1.0), (45.0, 0.6)])
def test_eot_paste_keeps_the_patch_inside_the_image(rotation, min_scale):
    """A white patch on a black image: all of its mass lands inside the image, whatever the transformation."""
    x = torch.zeros(64, 1, 20, 20)
    out = eot_paste(x, torch.ones(1, 4, 5), torch.rand(64, 4, generator=_gen()), min_scale=min_scale, rotation=rotation)
    mass = out.sum(dim=(1, 2, 3))
    assert (mass <= 20 * 1.01).all() and (mass >= 20 * min_scale**2 * 0.9).all()  # bilinear: mass kept roughly
    if rotation == 0 and min_scale == 1:
        assert torch.allclose(mass, torch.full_like(mass, 20.0), atol=1e-3)


def test_patch_shape_respects_the_budget():
    for area in (0.01, 0.02, 0.05, 0.1, 0.5):
        a, b = patch_shape(area, 28, 28)
        assert a * b <= area * 784 and b - a in (0, 1)
        assert (a + 1) * (a + 1) > area * 784  # the next square would be over budget
    assert patch_shape(0.05, 28, 28) == (6, 6) and patch_shape(0.1, 28, 28) == (8, 9)


def test_universal_patch_transfers_to_unseen_images(task):
    """A patch trained on one set of images fools images it never saw, far more than noise of the same size."""
    model = task[0]
    x, y = _blobs(200, seed=9)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    xtr, ytr = _blobs(256, seed=7)
    patch = train_patch(model, xtr, ytr, area=0.05, generator=_gen(),
                        training=attacks.patch.PatchTraining(steps=60, lr=0.1, batch_size=64))
    assert tuple(patch.shape[1:]) in patch_shapes(0.05, SIZE, SIZE)  # the default tries every shape
    trained = attacks.UniversalPatch(patch=patch)(model, x, y, generator=_gen(1)).success.float().mean()
    noise = attacks.UniversalPatch(patch=noise_patch(tuple(patch.shape), _gen(2)))(model, x, y, generator=_gen(1))
    assert trained >= 0.5 and trained > noise.success.float().mean() + 0.3


def test_noise_control_draws_a_fresh_patch_per_image(task):
    """The control pastes uniform noise of the given patch's footprint, a different patch on every image, and
    ignores the patch's values; its draws come from each image's own stream (batch-independent, seeded)."""
    model, x, y = task
    patch = _fixed_patch()
    res = attacks.UniversalPatch(patch=patch, noise=True)(model, x, y, generator=_gen())
    windows = nn.functional.unfold(res.x_adv, 4).transpose(1, 2)  # (N, windows, 16)
    pasted = []
    for i, w in enumerate(windows):  # the pasted window: the one that differs from the image in most pixels
        before = nn.functional.unfold(x[i : i + 1], 4).transpose(1, 2)[0]
        pasted.append(w[(w != before).sum(dim=1).argmax()])
    pasted = torch.stack(pasted)
    assert len({tuple(p.tolist()) for p in pasted}) == len(pasted)  # a fresh draw per image
    assert not (pasted == patch.reshape(1, -1)).all(dim=1).any()  # not the given patch
    assert 0.35 < pasted.mean() < 0.65  # uniform values
    other = attacks.UniversalPatch(patch=torch.zeros(1, 4, 4), noise=True)(model, x, y, generator=_gen())
    assert torch.equal(other.x_adv, res.x_adv)  # only the footprint matters
    keys = attacks.rng.sample_keys(0, torch.arange(len(x)))
    whole = attacks.UniversalPatch(area=0.07, noise=True)(model, x, y, generator=keys)
    part = attacks.UniversalPatch(area=0.07, noise=True)(model, x[5:9], y[5:9], generator=keys[5:9])
    assert torch.equal(whole.x_adv[5:9], part.x_adv)


def test_refinement_fools_more_than_its_start(task):
    """From a mid-grey patch the discrete search moves pixels to black or white, one move per sweep at most, and
    the result fools more unseen images at random places than the start. Sweep ``s`` works on the next
    ``refine_images`` images (cycling), scoring the current patch and each candidate there: every pass is counted."""
    from attacks.base import Context
    from attacks.losses import margin
    from attacks.patch import PatchTraining, _capped, _refine
    from attacks.rng import SampleRNG

    model = task[0]
    xtr, ytr = _blobs(96, seed=11)
    ctx = Context(model, xtr, ytr, None, SampleRNG.from_generator(_gen(4), 96, xtr.device))
    training = PatchTraining(refine=6, refine_candidates=8, refine_images=64)
    start = torch.full((1, 3, 3), 0.5)
    out = _refine(ctx, start, training, _capped(margin, training.kappa))
    assert out.shape == start.shape
    changed = (out != start).flatten()
    assert 1 <= int(changed.sum()) <= 6
    assert ((out.flatten()[changed] == 0) | (out.flatten()[changed] == 1)).all()  # moves go to corners
    queries, gradients = torch.zeros(96, dtype=torch.long), torch.zeros(96, dtype=torch.long)
    for sweep in range(6):
        idx = (torch.arange(64) + 64 * sweep) % 96
        queries[idx] += 1 + 1 + 8  # the gradient pass, the current patch and 8 candidates
        gradients[idx] += 1
    assert torch.equal(ctx.queries, queries) and torch.equal(ctx.gradients, gradients)
    x, y = _blobs(256, seed=12)

    def fooled(patch):
        return sum(attacks.UniversalPatch(patch=patch)(model, x, y, generator=_gen(s)).success.sum() for s in range(4))

    assert fooled(out) > fooled(start)


def test_refinement_candidates_are_the_best_first_order_moves():
    """The candidates of a sweep are the single-pixel moves to a corner with the largest first-order gain: on a
    linear model, where that gain is exact, one sweep with one candidate makes the best move of all."""
    from attacks.base import Context
    from attacks.patch import PatchTraining, _refine, random_corners
    from attacks.rng import SampleRNG

    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).eval()
    x = torch.full((1, 3, 6, 6), 0.5)
    y = torch.tensor([0])
    ctx = Context(model, x, y, None, SampleRNG.from_generator(_gen(), 1, x.device))
    patch = torch.full((3, 2, 2), 0.5)

    def objective(logits, y, t):
        return logits[:, 1] - logits[:, 0]

    out = _refine(ctx, patch, PatchTraining(refine=1, refine_candidates=1, refine_images=1), objective)

    rows, cols = random_corners(SampleRNG.from_generator(_gen(), 1, x.device), torch.tensor([0]), (2, 2), 6, 6)
    with torch.no_grad():
        best = max(
            (float(objective(model(paste(x, cand, rows, cols)), y, None)), i)
            for i, cand in enumerate(_all_corner_moves(patch))
        )
    assert torch.equal(out, _all_corner_moves(patch)[best[1]])


def _all_corner_moves(patch):
    out = []
    for p in range(patch[0].numel()):
        for corner in range(8):
            cand = patch.flatten(1).clone()
            cand[:, p] = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], dtype=patch.dtype)
            out.append(cand.view_as(patch))
    return out


def test_capped_objective():
    from attacks.patch import _capped

    logits = torch.tensor([[0.0, 9.0], [0.0, 1.0]])
    y = torch.zeros(2, dtype=torch.long)
    capped = _capped(attacks.losses.margin, 5.0)
    assert torch.equal(capped(logits, y, None), torch.tensor([5.0, 1.0]))
    assert _capped(attacks.losses.margin, None) is attacks.losses.margin


def test_sink_objective_leaves_the_sink_class_out():
    """Towards the sink class for every image, except the images that already belong to it (zero loss there)."""
    from attacks.losses import cross_entropy
    from attacks.patch import _sink_objective

    logits = torch.randn(6, 4, generator=_gen(3))
    y = torch.tensor([0, 1, 2, 3, 2, 0])
    sink = torch.full((6,), 2)
    value = _sink_objective(cross_entropy)(logits, y, sink)
    assert torch.equal(value[y == 2], torch.zeros(2))
    assert torch.allclose(value[y != 2], cross_entropy(logits, y, sink)[y != 2])


def test_sink_search_picks_the_best_trial_and_only_when_untargeted(task, monkeypatch):
    """Untargeted with ``sink``: one trial of the plain loss and one per class, then the best trial's patch goes on
    training with its own objective; targeted training (or ``sink=False``) runs no trial at all."""
    import attacks.patch as patch_mod

    model = task[0]
    xtr, ytr = _blobs(128, seed=7)
    calls = []
    real_optimize, real_rate = patch_mod._optimize, patch_mod._fooling_rate

    def spy_optimize(ctx, patch, training, objective, steps):
        calls.append((None if ctx.aim is None else int(ctx.aim[0]), steps))
        return real_optimize(ctx, patch, training, objective, steps)

    rates = iter([0.1, 0.2, 0.9, 0.3, 0.4])  # plain, then classes 0..3: class 1 has the best trial
    monkeypatch.setattr(patch_mod, "_optimize", spy_optimize)
    monkeypatch.setattr(patch_mod, "_fooling_rate", lambda ctx, patch: next(rates))
    training = patch_mod.PatchTraining(steps=7, trial_steps=3, batch_size=32)
    train_patch(model, xtr, ytr, area=0.05, shape="square", generator=_gen(), training=training)
    assert calls == [(None, 3), (0, 3), (1, 3), (2, 3), (3, 3), (1, 7)]

    calls.clear()
    targeted = train_patch(model, xtr, ytr, area=0.05, shape="square", target=2, generator=_gen(), training=training)
    assert calls == [(2, 7)]
    calls.clear()
    monkeypatch.setattr(patch_mod, "_fooling_rate", real_rate)
    plain = patch_mod.PatchTraining(steps=7, trial_steps=3, batch_size=32, sink=False)
    assert torch.equal(train_patch(model, xtr, ytr, area=0.05, shape="square", target=2, generator=_gen(),
                                   training=plain), targeted)
    train_patch(model, xtr, ytr, area=0.05, shape="square", generator=_gen(), training=plain)
    assert calls == [(2, 7), (None, 7)]


def test_patch_shapes_are_the_largest_rectangles_within_the_budget():
    for area in (0.01, 0.02, 0.05, 0.1, 0.3):
        budget = area * 784
        shapes = patch_shapes(area, 28, 28)
        assert shapes == sorted(shapes) and len(set(shapes)) == len(shapes)
        def fits(a, b):
            return 1 <= a <= 28 and 1 <= b <= 28 and a * b <= budget and max(a, b) <= 5 * min(a, b)

        for a, b in shapes:
            assert fits(a, b) and not fits(a + 1, b) and not fits(a, b + 1)
        # every rectangle of the budget and aspect lies inside one of them
        for a in range(1, 29):
            for b in range(1, 29):
                if fits(a, b):
                    assert any(a <= p and b <= q for p, q in shapes), (area, a, b)
    assert patch_shapes(0.05, 28, 28) == [(3, 13), (4, 9), (5, 7), (6, 6), (7, 5), (9, 4), (13, 3)]


def test_patch_footprints_name_the_rectangles_to_train():
    assert patch_footprints("auto", 0.05, 28, 28) == patch_shapes(0.05, 28, 28)
    assert patch_footprints("square", 0.05, 28, 28) == [(6, 6)]
    assert patch_footprints((13, 3), 0.05, 28, 28) == [(13, 3)]
    for shape, match in [((7, 6), "more than area=0.05"), ((29, 1), "does not fit"), ((0, 3), "does not fit"),
                         ("round", "shape must be one of"), ((2.0, 3), "rows, cols"), ((1, 2, 3), "rows, cols")]:
        with pytest.raises(ValueError, match=match):
            patch_footprints(shape, 0.05, 28, 28)


def test_auto_shape_trains_the_shape_with_the_best_trial(task, monkeypatch):
    """``shape="auto"``: one short trial per shape (and per objective), then the winner's shape and objective go on
    training; the patch returned has the winning trial's shape."""
    import attacks.patch as patch_mod

    model = task[0]
    xtr, ytr = _blobs(128, seed=7)
    shapes = patch_shapes(0.05, SIZE, SIZE)
    assert len(shapes) >= 2
    seen = []
    real_optimize = patch_mod._optimize

    def spy_optimize(ctx, patch, training, objective, steps):
        seen.append((tuple(patch.shape[1:]), None if ctx.aim is None else int(ctx.aim[0]), steps))
        return real_optimize(ctx, patch, training, objective, steps)

    winner = len(shapes) - 1  # the last shape's plain-loss trial fools the most
    rates = iter([0.9 if i == winner else 0.1 for i in range(len(shapes))])
    monkeypatch.setattr(patch_mod, "_optimize", spy_optimize)
    monkeypatch.setattr(patch_mod, "_fooling_rate", lambda ctx, patch: next(rates))
    training = patch_mod.PatchTraining(steps=5, trial_steps=2, batch_size=32, sink=False, refine=0)
    patch = train_patch(model, xtr, ytr, area=0.05, generator=_gen(), training=training)
    assert seen == [(s, None, 2) for s in shapes] + [(shapes[winner], None, 5)]
    assert tuple(patch.shape[1:]) == shapes[winner]


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("area", [0, 1, -0.1, 1.5, float("nan"), "0.05"])
@pytest.mark.parametrize("cls", [attacks.UniversalPatch, attacks.LocalizedPatch])
def test_area_outside_the_unit_interval_is_refused(cls, area):
    with pytest.raises(ValueError, match="area"):
        cls(area=area)


def test_area_below_one_pixel_is_refused(task):
    model, x, y = task
    with pytest.raises(ValueError, match="less than one pixel"):
        attacks.LocalizedPatch(area=0.001)(model, x, y)


@pytest.mark.parametrize("cls", [attacks.OnePixel, attacks.GreedyL0])
def test_bad_pixel_counts_are_refused(task, cls):
    model, x, y = task
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="pixels"):
            cls(pixels=bad)
    with pytest.raises(ValueError, match="more than the 256 pixels"):
        cls(pixels=SIZE * SIZE + 1)(model, x, y)
    with pytest.raises(ValueError, match="more than the 256 pixels"):
        cls(pixels=SIZE * SIZE + 1).check_images((1, SIZE, SIZE))  # before any work, as the CLI does
    cls(pixels=SIZE * SIZE).check_images((1, SIZE, SIZE))


@pytest.mark.parametrize(
    "patch,match",
    [
        (torch.rand(4, 4), "shape"),
        (torch.rand(4, 3, 3), "shape"),
        (torch.rand(1, 0, 3), "shape"),
        (torch.full((1, 3, 3), 2.0), r"\[0, 1\]"),
        (torch.full((1, 3, 3), float("nan")), r"\[0, 1\]"),
        (torch.ones(1, 3, 3, dtype=torch.uint8), "floating"),
        ([[0.5]], "tensor"),
    ],
)
def test_malformed_patches_are_refused(patch, match):
    with pytest.raises(ValueError, match=match):
        attacks.UniversalPatch(patch=patch)


@pytest.mark.parametrize(
    "patch,area,match",
    [
        (torch.rand(3, 4, 4), None, "channel"),
        (torch.rand(1, 17, 4), None, "does not fit"),
        (torch.rand(1, 8, 8), 0.1, "more than area"),
    ],
)
def test_patches_that_do_not_fit_the_images_are_refused(task, patch, area, match):
    model, x, y = task
    with pytest.raises(ValueError, match=match):
        attacks.UniversalPatch(patch=patch, area=area)(model, x, y)
    with pytest.raises(ValueError, match=match):
        attacks.UniversalPatch(patch=patch, area=area).check_images(tuple(x.shape[1:]))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_target_class_out_of_range_is_refused(task, name):
    model, x, y = task
    with pytest.raises(ValueError, match="target class 7 is out of range"):
        ATTACKS[name]()(model, x, y, target=7)


@pytest.mark.parametrize(
    "kwargs",
    [{"population": 3}, {"steps": -1}, {"mutation": 0}, {"mutation": 3}, {"max_queries": 10}, {"max_batch": 0}],
)
def test_bad_evolution_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        attacks.OnePixel(**kwargs)


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"alpha": 0}, {"location": "corner"}, {"loss": "hinge"}])
def test_bad_localized_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        attacks.LocalizedPatch(**kwargs)


# -- patch files and `robustcnn patch train` ----------------------------------------------------------------------
QUICK = ("--dataset", "shapes", "--model", "lenet5", "--limit", "256", "--epochs", "1", "--batch-size", "64",
         "--device", "cpu")


def test_saved_patches_load_back(tmp_path):
    patch = torch.rand(3, 5, 6, generator=_gen())
    png, pt = save_patch(patch, tmp_path / "p-0.5pct")
    assert png.name == "p-0.5pct.png" and pt.name == "p-0.5pct.pt"
    assert torch.equal(load_patch(pt), patch)
    assert (load_patch(png) - patch).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
    assert load_patch(pt, image_shape=(3, 32, 32)).shape == (3, 5, 6)


def test_bad_patch_files_say_what_is_wrong(tmp_path):
    torch.save(torch.rand(5, 6), tmp_path / "flat.pt")
    torch.save({"patch": torch.rand(1, 2, 2)}, tmp_path / "dict.pt")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGBA", (3, 3)).save(tmp_path / "alpha.png")
    (tmp_path / "text.pt").write_text("not a tensor")
    save_patch(torch.rand(1, 4, 4), tmp_path / "grey")
    for name, match in [("flat.pt", "shape"), ("dict.pt", "holds a dict"), ("text.png", "not an image"),
                        ("text.pt", "not a tensor file"), ("alpha.png", "without alpha")]:
        with pytest.raises(UsageError, match=match):
            load_patch(tmp_path / name)
    with pytest.raises(UsageError, match="channel"):
        load_patch(tmp_path / "grey.png", image_shape=(3, 32, 32))
    with pytest.raises(UsageError, match="does not fit"):
        load_patch(tmp_path / "grey.pt", image_shape=(1, 3, 3))
    with pytest.raises(RobustCNNError, match="cannot read") as err:
        load_patch(tmp_path / "missing.pt")
    assert not isinstance(err.value, UsageError) and err.value.exit_code == 1


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    """A quick shapes checkpoint (32x32 RGB, 5 classes) made by `robustcnn train`; the environment to use it."""
    root = tmp_path_factory.mktemp("patch-cli")
    env = {"ROBUSTCNN_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        result = run_cli("train", *QUICK, "--out", str(root / "runs"), "--json")
    assert result.exit_code == 0, result.stderr
    return root / "runs" / "shapes-lenet5.pt", env


@pytest.fixture
def cli_env(shapes_model, monkeypatch):
    for key, value in shapes_model[1].items():
        monkeypatch.setenv(key, value)
    return shapes_model[0]


def test_patch_measures_accuracy_on_every_patched_image(task):
    """``patched_accuracy`` is the accuracy on all images with the patch, misclassified ones included, with each
    image at the same place as in the robust accuracy (which counts only images correct with and without it)."""
    from attacks.evaluate import attack_stream
    from attacks.rng import sample_keys
    from robustcnn.patches import measure_patch

    model = task[0]
    x, y = _blobs(120, seed=13)
    y[::6] = (y[::6] + 1) % 4  # wrong labels: images the model gets wrong, which a patch may happen to put right
    patch = torch.ones(1, 5, 5)
    m = measure_patch(model, x, y, patch, target=None, seed=3, batch_size=32, device=torch.device("cpu"))
    atk = attacks.UniversalPatch(patch=patch)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    fooled = atk(model, x, y, generator=sample_keys(3, torch.arange(120), attack_stream(atk))).success
    assert not clean.all() and m["clean_accuracy"] == pytest.approx(clean.float().mean().item())
    assert m["patched_accuracy"] == pytest.approx(1 - fooled.float().mean().item())
    assert m["robust_accuracy"] == pytest.approx((clean & ~fooled).float().mean().item())
    assert m["success_rate"] == pytest.approx(fooled[clean].float().mean().item())
    assert m["patched_accuracy"] > m["robust_accuracy"]  # the patch put some misclassified images right


def test_patch_measure_over_several_draws(task):
    """With ``draws`` the figures are means over that many placements per image, draw ``d`` being the one-draw
    measure of seed ``seed + d``; ``drop_sd`` is the spread of the accuracy drop over the draws."""
    from robustcnn.patches import measure_patch

    model = task[0]
    x, y = _blobs(96, seed=17)
    patch = torch.ones(1, 6, 6)
    run = dict(target=None, batch_size=32, device=torch.device("cpu"))
    many = measure_patch(model, x, y, patch, seed=5, draws=3, **run)
    singles = [measure_patch(model, x, y, patch, seed=5 + d, **run) for d in range(3)]
    assert len(many["draws"]) == 3
    for draw, single in zip(many["draws"], singles):
        assert single["draws"] == [draw] and single["drop_sd"] == 0.0
    patched = [s["patched_accuracy"] for s in singles]
    assert len(set(patched)) > 1  # the places differ between draws, and so does the accuracy
    for key in ("patched_accuracy", "robust_accuracy", "success_rate"):
        assert many[key] == pytest.approx(sum(s[key] for s in singles) / 3)
    assert many["drop_sd"] == pytest.approx(torch.tensor(patched, dtype=torch.float64).std().item())
    assert many["clean_accuracy"] == singles[0]["clean_accuracy"]


def test_patch_train_saves_and_measures(cli_env, tmp_path):
    result = run_cli("patch", "train", "--area", "0.02,0.1", "--steps", "3", "--train-images", "64", "--n", "48",
                     "--draws", "2", "--out", str(tmp_path / "p.png"), "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["draws"] == 2 and all(len(r[k]["draws"]) == 2 for r in doc["results"] for k in ("patch", "noise"))
    assert [r["area_requested"] for r in doc["results"]] == [0.02, 0.1]
    for row, pct in zip(doc["results"], ("2", "10")):
        patch = load_patch(row["tensor"], image_shape=(3, 32, 32))
        assert list(patch.shape) == row["patch_shape"]
        assert tuple(patch.shape[1:]) in patch_shapes(row["area_requested"], 32, 32)  # --shape auto
        assert row["png"].endswith(f"p-{pct}pct.png") and load_patch(row["png"]).shape == patch.shape
        for kind in ("patch", "noise"):
            m = row[kind]
            assert 0 <= m["robust_accuracy"] <= m["clean_accuracy"] <= 1 and m["area"] <= row["area_requested"]
            # every image correct without and with the patch is counted in both; the patched accuracy may also
            # count images the patch happened to put right, and never more than the misclassified ones
            assert m["robust_accuracy"] <= m["patched_accuracy"] <= m["robust_accuracy"] + 1 - m["clean_accuracy"]


@pytest.mark.parametrize("shape,expected", [("square", (7, 7)), ("13X3", (13, 3))])
def test_patch_train_shape_option(cli_env, tmp_path, shape, expected):
    """--shape square trains the near-square patch only, --shape ROWSxCOLS that rectangle (5 % of 32x32 images)."""
    result = run_cli("patch", "train", "--shape", shape, "--steps", "2", "--refine", "0", "--train-images", "32",
                     "--n", "16", "--draws", "1", "--out", str(tmp_path / "p"), "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["shape"] == (shape if shape == "square" else list(expected))
    assert doc["results"][0]["patch_shape"] == [3, *expected]


def test_patch_train_human_table_names_the_control(cli_env, tmp_path):
    result = run_cli("patch", "train", "--steps", "2", "--train-images", "32", "--n", "32", "--target", "1",
                     "--out", str(tmp_path / "t"), "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "noise" in result.stdout and "target 1" in result.stdout and "robust" in result.stdout
    # the default 4 draws: each row's drop with its spread over them
    assert "4 random locations" in result.stdout and len(re.findall(r"\d ± \d", result.stdout)) == 2
    assert f"saved {tmp_path / 't.png'} and {tmp_path / 't.pt'}" in result.stdout
    assert (tmp_path / "t.png").is_file() and (tmp_path / "t.pt").is_file()


@pytest.mark.parametrize(
    "args,match",
    [
        (("--area", "0"), "in \\(0, 1\\)"),
        (("--area", "1.5"), "in \\(0, 1\\)"),
        (("--area", "abc"), "invalid --area"),
        (("--area", "0.0001"), "less than one pixel"),
        (("--target", "99"), "--target must be a class index"),
        (("--steps", "0"), "--steps must be > 0"),
        (("--draws", "0"), "--draws must be > 0"),
        (("--shape", "round"), "invalid --shape 'round'"),
        (("--shape", "9x9"), "--area 0.05: a 9x9 patch covers 7.91% .* more than area=0.05"),
        (("--shape", "40x1"), "does not fit inside a 32x32 image"),
    ],
)
def test_patch_train_bad_input_is_a_usage_error(cli_env, tmp_path, args, match):
    result = run_cli("patch", "train", "--n", "8", "--out", str(tmp_path / "x"), "--device", "cpu", *args)
    line = assert_one_line_error(result, 2)
    assert re.search(match, line), line


def test_patch_train_missing_checkpoint_is_a_runtime_error(cli_env, tmp_path):
    result = run_cli("patch", "train", "--checkpoint", str(tmp_path / "none.pt"), "--device", "cpu")
    assert "not found" in assert_one_line_error(result, 1)


def test_ranked_windows_do_not_overlap():
    weight = torch.zeros(1, 1, 12, 12)
    weight[0, 0, 1, 1] = 5.0
    weight[0, 0, 2, 2] = 4.0  # inside the first window: must not give the second
    weight[0, 0, 9, 9] = 3.0
    rows, cols = ranked_windows(weight, (3, 3), 2)
    assert rows.shape == (2, 1)
    first, second = (int(rows[0, 0]), int(cols[0, 0])), (int(rows[1, 0]), int(cols[1, 0]))
    assert first[0] <= 1 <= first[0] + 2 and first[1] <= 1 <= first[1] + 2  # covers the strongest spot
    assert 7 <= second[0] <= 9 and 7 <= second[1] <= 9  # the window around the far spot


def test_more_lavan_locations_fool_more(task):
    """Later locations only run on images the first one did not fool, so success can only grow."""
    model, x, y = task
    one = attacks.LocalizedPatch(area=0.05, steps=5, restarts=1)(model, x, y, generator=_gen())
    three = attacks.LocalizedPatch(area=0.05, steps=5, restarts=3)(model, x, y, generator=_gen())
    assert (three.success | ~one.success).all()
    assert torch.equal(three.queries[one.success], one.queries[one.success])
    assert (three.queries[~one.success] > one.queries[~one.success]).all()


def test_set_pixels_in_place_equals_the_copy():
    """The in-place variant sets the same values in the caller's tensor; the copying one leaves its input alone."""
    from attacks.sparse import set_pixels, set_pixels_

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 6, generator=g)
    pos = torch.randint(0, 30, (4, 2), generator=g)
    values = torch.rand(4, 2, 3, generator=g)
    before = x.clone()
    copy = set_pixels(x, pos, values)
    assert torch.equal(x, before) and not torch.equal(copy, x)
    target = x.clone()
    assert set_pixels_(target, pos, values) is target and torch.equal(target, copy)
    with pytest.raises(ValueError, match="contiguous"):
        set_pixels_(x.transpose(2, 3), pos, values)


def test_pixel_calls_default_to_the_cpu_call_size(task):
    """Without ``max_batch``, candidate batches go to the model in calls of the measured CPU size, and the result
    is the one of a single call per generation."""
    import dataclasses

    from attacks.oracle import CPU_ROWS_PER_CALL

    model, x, y = task
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        small = attacks.OnePixel(pixels=1, population=2 * CPU_ROWS_PER_CALL // len(y) + 8, steps=2)
        res = small(model, x, y, generator=_gen())
    finally:
        hook.remove()
    assert max(calls) == CPU_ROWS_PER_CALL
    whole = dataclasses.replace(small, max_batch=10 ** 6)(model, x, y, generator=_gen())
    assert torch.equal(res.x_adv, whole.x_adv) and torch.equal(res.queries, whole.queries)
