"""The attack contract, checked for every registered attack (a new attack is covered by registering it)."""

from __future__ import annotations

import warnings

import pytest
import torch

import attacks
from attacks.base import BoundedAttack, MinNormAttack
from attacks.params import parameters

def build_fast(name: str, **extra):
    """The attack with the fast setting its fields declare (``param(..., fast=...)``: quick on the tiny model, a
    large budget), then ``extra``."""
    return attacks.get(name).build(**{**attacks.get(name).fast, **extra})


ALL = attacks.available()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ALL)
def test_contract(name, trained):
    model, x, y = trained
    x0, before = x.clone(), _state(model)
    atk = build_fast(name)
    res = atk(model, x, y, generator=torch.Generator().manual_seed(1))

    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype and res.x_adv.device == x.device
    assert torch.equal(x, x0), "x was modified"
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    if isinstance(atk, (BoundedAttack, MinNormAttack)) and atk.eps is not None:
        measured = atk.norm_obj.measure(res.x_adv - x)
        assert (measured <= atk.eps * (1 + 1e-5) + 1e-6).all(), f"budget {atk.eps} exceeded: {measured.max()}"
        assert torch.allclose(res.norms, measured)
    with torch.no_grad():
        repredicted = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, repredicted != y), "success flags disagree with re-prediction"
    assert not model.training, "model mode changed"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "parameters changed"
    assert all(p.grad is None for p in model.parameters()), "parameter gradients were written"
    assert res.queries.dtype == torch.long and (res.queries[res.success] >= 1).all()
    assert res.queries.shape == res.success.shape == res.norms.shape == (x.shape[0],)
    # unsuccessful samples of a bounded attack must still be *attempts*: fooled ones must really be fooled
    assert res.success.float().mean() >= 0.5, f"{name} fooled only {res.success.float().mean():.0%} at a large budget"


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_result(name, trained):
    model, x, y = trained
    atk = build_fast(name)
    a = atk(model, x[:16], y[:16], generator=torch.Generator().manual_seed(7))
    b = atk(model, x[:16], y[:16], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success) and torch.equal(a.queries, b.queries)
    # perturb (adversarial training) makes the same examples: it only skips passes that learn who was fooled
    assert torch.equal(atk.perturb(model, x[:16], y[:16], generator=torch.Generator().manual_seed(7)), a.x_adv)


@pytest.mark.parametrize("name", [n for n in ALL if attacks.get(n).targeted])
def test_targeted_success_means_target_reached(name, trained):
    model, x, y = trained
    target = (y + 1) % 4
    res = build_fast(name)(model, x[:32], y[:32], target=target[:32])
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == target[:32])
    assert res.success.any(), f"{name} reached no target at a large budget"


@pytest.mark.parametrize("name", ALL)
def test_a_warm_start_is_kept_inside_the_budget_or_refused(name, trained):
    """Only the gradient-ascent family takes a start; a start far outside the budget is projected onto it."""
    model, x, y = trained
    x, y = x[:16], y[:16]
    atk = build_fast(name)
    far = torch.full_like(x, 5.0).index_fill_(0, torch.arange(0, 16, 2), -5.0)
    if not atk.accepts_start:
        with pytest.raises(ValueError, match="takes no start"):
            atk(model, x, y, start=far)
        return
    given = far.clone()
    res = atk(model, x, y, start=far)
    assert torch.equal(far, given), "start was modified"
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert (atk.norm_obj.measure(res.x_adv - x) <= atk.eps * (1 + 1e-5) + 1e-6).all()
    with torch.no_grad():
        assert torch.equal(res.success, model(res.x_adv).argmax(1) != y)
    with pytest.raises(ValueError, match="shaped like x"):
        atk(model, x, y, start=far[:3])
    with pytest.raises(ValueError, match="finite"):
        atk(model, x, y, start=far.clone().fill_(float("nan")))


@pytest.mark.parametrize("name", [n for n in ALL if not attacks.get(n).targeted])
def test_untargeted_only_attacks_refuse_a_target(name, trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="no targeted mode"):
        build_fast(name)(model, x[:4], y[:4], target=0)


@pytest.mark.parametrize("name", ALL)
def test_train_mode_warns_and_is_kept(name, trained):
    model, x, y = trained
    model.train()
    try:
        with pytest.warns(UserWarning, match="training mode"):
            build_fast(name)(model, x[:4], y[:4])
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


def test_registry_lists_every_kind_and_describes_each():
    for name in ALL:
        spec = attacks.get(name)
        assert spec.kind in attacks.KINDS and spec.description and spec.norms
    assert set(attacks.available("white-box")) >= {"fgsm", "bim", "pgd", "mifgsm", "apgd", "apgd-t", "cw",
                                                   "deepfool", "eotpgd"}


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_is_described_and_its_fast_setting_is_valid(name):
    """Each field carries a help text and a type; the fast setting names only fields and builds (the attack's own
    validation accepts it), and text parsed by a field's type gives back its default."""
    spec = attacks.get(name)
    assert spec.parameters and [p.name for p in spec.parameters] == list(spec.params)
    for p in spec.parameters:
        assert p.help.strip() and p.help.rstrip().endswith((".", ")")), f"{name}.{p.name} lacks a help text"
        assert p.type_name
        if isinstance(p.default, (bool, int, float, str)) or p.default is None and p.name != "patch":
            assert p.parse(str(p.default)) == p.default, (name, p.name)
    assert set(spec.fast) <= set(spec.params)
    build_fast(name)


def test_runtime_fields_keep_their_flag_and_stay_out_of_config():
    flagged = {(n, p.name) for n in ALL for p in attacks.get(n).parameters if p.runtime}
    assert ("square", "work_set") in flagged and ("boundary", "rows_per_call") in flagged
    for n, field in flagged:
        assert field not in attacks.get(n).build().config()


def test_parameter_text_is_read_by_the_field_type():
    pgd, bim, ph = attacks.get("pgd"), attacks.get("bim"), attacks.get("patch")
    assert pgd.parameter("steps").parse(" 7 ") == 7 and bim.parameter("steps").parse("None") is None
    assert pgd.parameter("eps").parse("8/255") == 8 / 255 and pgd.parameter("eps").type_name == "float or None"
    assert pgd.parameter("random_start").parse("no") is False and pgd.parameter("loss").parse("dlr") == "dlr"
    for p, text, match in [(pgd.parameter("steps"), "2.5", "whole number"), (pgd.parameter("steps"), "none", "whole"),
                           (pgd.parameter("eps"), "1/0", "number such as"), (pgd.parameter("eps"), "inf", "finite"),
                           (pgd.parameter("random_start"), "maybe", "true or false"),
                           (ph.parameter("patch"), "x.pt", "cannot be given as text")]:
        with pytest.raises(ValueError, match=match):
            p.parse(text)
    with pytest.raises(ValueError, match="pgd has no parameter 'decay'; it takes eps, norm, steps"):
        pgd.parameter("decay")


def test_parameters_of_an_unregistered_attack_class():
    """KLPGD (exported, not registered) describes its fields the same way."""
    assert "KLPGD" in attacks.__all__ and "pgd-kl" not in ALL
    assert {p.name: p.default for p in parameters(attacks.KLPGD)}["early_stop"] is False
    assert all(p.help for p in parameters(attacks.KLPGD))


def test_every_registered_attack_class_is_exported():
    for name in ALL:
        cls = attacks.get(name).factory
        assert getattr(attacks, cls.__name__) is cls and cls.__name__ in attacks.__all__
    assert all(hasattr(attacks, c) for c in attacks.__all__) and len(set(attacks.__all__)) == len(attacks.__all__)


def test_unknown_attack_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean pgd"):
        attacks.get("pgdd")


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("pgd", {"eps": -0.1}, "eps must be >= 0"),
        ("pgd", {"eps": 1.5}, "eps must be <= 1"),
        ("pgd", {"steps": 0}, "steps must be >= 1"),
        ("pgd", {"norm": "l0"}, "does not support norm"),
        ("fgsm", {"steps": 3}, "does not take steps"),
        ("apgd", {"loss": "margin"}, "loss must be one of"),
        ("cw", {"norm": "linf"}, "does not support norm"),
        ("deepfool", {"candidates": 1}, "candidates must be >= 2"),
        ("mifgsm", {"decay": -1.0}, "decay must be >= 0"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.get(name).build(**kwargs)


def test_bad_inputs_are_refused(trained):
    model, x, y = trained
    atk = attacks.FGSM(eps=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        atk(model, x * 2 + 0.5, y)
    with pytest.raises(ValueError, match="labels of shape"):
        atk(model, x, y[:3])
    with pytest.raises(ValueError, match="floating-point"):
        atk(model, (x * 255).to(torch.uint8), y)


def test_non_finite_model_output_raises(trained):
    _, x, y = trained

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, inp):
            out = inp.flatten(1)[:, :4] * self.w
            out[0, 0] = float("nan")
            return out

    with pytest.raises(attacks.NonFiniteOutputError, match="non-finite"):
        attacks.PGD(eps=0.1, steps=2)(Broken().eval(), x, y)
