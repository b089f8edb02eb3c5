"""Every attack, ``attacks.evaluate`` and the report leave the model exactly as they found it, and refuse or handle
inputs that would otherwise end in a raw torch error (labels out of range, a float64 model, probability outputs).

The model here has batch norm and dropout and is put in training mode: a forward pass in training mode moves the
batch-norm running statistics (and ``num_batches_tracked``), so without :class:`attacks.base.ModelState` putting the
buffers back, the state-dict comparisons below fail for every attack.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attacks
from attacks.base import LabelRangeError
from conftest import make_blobs
from robustcnn.report import ReportRequest, run_report
from test_attack_contract import ALL, build_fast


class NormNet(nn.Module):
    """A tiny CNN with the layers whose state or behaviour depends on the mode."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 16, classes))

    def forward(self, x):
        return self.net(x)


#: Settings cheaper still than the contract tests' fast ones, where those take long on an untrained model.
CHEAP = {"patch": {"trial_steps": 2, "refine": 0}, "boundary": {"max_queries": 50},
         "hopskipjump": {"max_queries": 50, "init_evals": 10, "max_evals": 20}, "cw": {"steps": 5, "binary_steps": 1}}


def _cheap(name: str):
    return build_fast(name, **CHEAP.get(name, {}))


def _model(grads: bool = False) -> nn.Module:
    torch.manual_seed(3)
    model = NormNet()
    with torch.no_grad():  # non-trivial running statistics, so a restored copy differs from the defaults
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    model.train()
    model.net[5].eval()  # a mixed mode: only the dropout in eval, which must stay so
    if grads:  # every other parameter gets a gradient; the others keep None
        for p in list(model.parameters())[::2]:
            p.grad = torch.randn_like(p)
    return model


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def _assert_unchanged(model: nn.Module, before) -> None:
    state, modes, grads = before
    after = model.state_dict()
    assert state.keys() == after.keys()
    changed = [k for k in state if not torch.equal(state[k], after[k])]
    assert not changed, f"state_dict entries changed: {changed}"
    assert [m.training for m in model.modules()] == modes, "module modes changed"
    for g, p in zip(grads, model.parameters()):
        assert (g is None) == (p.grad is None) and (g is None or torch.equal(g, p.grad)), "a .grad changed"


@pytest.mark.parametrize("name", ALL)
def test_attack_leaves_a_training_mode_model_as_it_was(name):
    model = _model(grads=True)
    x, y = make_blobs(4, seed=4)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _cheap(name)(model, x, y)
        _cheap(name).perturb(model, x, y)
    _assert_unchanged(model, before)


def test_evaluate_leaves_a_training_mode_model_as_it_was():
    model = _model(grads=True)
    x, y = make_blobs(16, seed=4)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attacks.evaluate(model, (x, y), [build_fast("fgsm"), build_fast("square")], batch_size=8)
    _assert_unchanged(model, before)


def test_report_leaves_a_training_mode_model_as_it_was(tmp_path):
    model = _model(grads=True)
    x, y = make_blobs(16, seed=4)
    req = ReportRequest(suite=None, attacks=["fgsm"], eps=[0.1], norm="linf", n=16, seed=0,
                        checkpoint_sha256="0" * 64, dataset="blobs")
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_report(model, x, y, req, tmp_path / "rep", device=torch.device("cpu"), batch_size=8)
    _assert_unchanged(model, before)


# -- labels outside the model's classes ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_a_label_outside_the_classes_is_a_clear_value_error(name, trained):
    model, x, y = trained
    bad = y[:4].clone()
    bad[1] = 12
    with pytest.raises(LabelRangeError, match=r"^label 12 is out of range: the model has 4 classes"):
        _cheap(name)(model, x[:4], bad)


def test_a_target_outside_the_classes_is_a_clear_value_error(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match=r"^target class 7 is out of range: the model has 4 classes"):
        attacks.PGD(eps=0.1, steps=2)(model, x[:4], y[:4], target=7)
    with pytest.raises(ValueError, match=r"^label -1 is out of range"):
        attacks.FGSM(eps=0.1)(model, x[:4], torch.tensor([0, -1, 1, 2]))


@pytest.mark.parametrize("where", [0, 63, 100])  # in the sanity batch, its last sample, beyond it
def test_evaluate_refuses_a_label_outside_the_classes(trained, where):
    model, _, _ = trained
    x, y = make_blobs(128, seed=5)
    y[where] = 10
    with pytest.raises(ValueError, match=r"^label 10 is out of range: the model has 4 classes"):
        attacks.evaluate(model, (x, y), [attacks.FGSM(eps=0.1)], batch_size=32)


# -- a float64 model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_a_float64_model_is_attacked_on_float32_inputs(name, trained):
    model, x, y = trained
    double = type(model)().double().eval()
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    res = _cheap(name)(double, x[:4], y[:4])
    assert res.x_adv.dtype == torch.float32 and res.x_adv.shape == x[:4].shape
    with torch.no_grad():
        assert torch.equal(res.success, double(res.x_adv.double()).argmax(1) != y[:4])


def test_evaluate_runs_a_float64_model(trained):
    model, x, y = trained
    double = type(model)().double().eval()
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    rep = attacks.evaluate(double, (x, y), [attacks.FGSM(eps=0.1)], batch_size=32)
    ref = attacks.evaluate(model, (x, y), [attacks.FGSM(eps=0.1)], batch_size=32)
    assert rep.clean_accuracy == ref.clean_accuracy and rep.n == 64


# -- probabilities instead of logits ----------------------------------------------------------------------------
class Softmaxed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(dim=1)


@pytest.mark.parametrize("name", ["fgsm", "square", "hopskipjump"])
def test_a_direct_attack_call_warns_once_about_probability_outputs(name, trained):
    model, x, y = trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cheap(name)(Softmaxed(model).eval(), x[:4], y[:4])
    found = [w for w in caught if "probabilities" in str(w.message)]
    assert len(found) == 1 and issubclass(found[0].category, attacks.base.ModelOutputWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cheap(name)(model, x[:4], y[:4])
    assert not [w for w in caught if "probabilities" in str(w.message)]


def test_evaluate_warns_about_probabilities_once_not_once_per_batch(trained):
    model, x, y = trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attacks.evaluate(Softmaxed(model).eval(), (x, y), [attacks.FGSM(eps=0.1)], batch_size=8)
    assert len([w for w in caught if "probabilities" in str(w.message)]) == 1
