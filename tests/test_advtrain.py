"""Adversarial training: the methods, the kept epoch, overfitting detection, determinism, resume, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import attacks
import robustcnn.train as train_module
from attacks.rng import sample_keys
from robustcnn.advtrain import AdvConfig, AdversarialTraining, overfitting
from robustcnn.distributed import DistContext
from robustcnn.checkpoint import load_model, read_checkpoint
from robustcnn.data import ImageData
from robustcnn.errors import UsageError
from robustcnn.train import BatchPosition, TrainConfig, train
from train_fixtures import assert_one_line_error, isolated, run_cli, shapes  # noqa: F401

EPS = 0.13


def stripes(count: int, seed: int) -> ImageData:
    """A 12x12 task a plain CNN learns in seconds but not robustly: the class is the half (top, bottom, left, right)
    that is 0.3 brighter, under strong noise. Within eps 0.13 a robust signal is left, which plain training does
    not learn to rely on (measured: PGD accuracy 9 % plain, 44 % after PGD training)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (count,), generator=g)
    x = 0.35 + 0.12 * torch.randn(count, 1, 12, 12, generator=g)
    for c, (rows, cols) in enumerate(((slice(0, 6), slice(None)), (slice(6, 12), slice(None)),
                                      (slice(None), slice(0, 6)), (slice(None), slice(6, 12)))):
        x[(y == c).nonzero()[:, 0][:, None], :, rows, cols] += 0.3
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(images, y, ("top", "bottom", "left", "right"), "shapes")


def config(**overrides) -> TrainConfig:
    values = dict(model="simple", dataset="shapes", epochs=3, batch_size=32, optimizer="adam", seed=0,
                  arch_args={"width": 8, "hidden": 32})
    values.update(overrides)
    return TrainConfig(**values)


def adv(**overrides) -> AdvConfig:
    values = dict(method="pgd", eps=EPS, steps=3, val_count=128, val_steps=5)
    values.update(overrides)
    return AdvConfig(**values)


@pytest.fixture(scope="module")
def data():
    return stripes(640, 1), stripes(200, 2)


def robust_accuracy(model: nn.Module, test: ImageData) -> float:
    x, y = test.images.float() / 255, test.labels
    res = attacks.PGD(eps=EPS, steps=10)(model.eval(), x, y)
    return float((~res.success).float().mean())


# -- the threat-model config ---------------------------------------------------------------------------------------
def test_config_fills_in_the_method_defaults_and_stores_them():
    c = AdvConfig(method="pgd", eps=0.1)
    assert (c.steps, c.alpha, c.beta) == (5, pytest.approx(0.05), None)
    fast = AdvConfig(method="fast", eps=0.1)
    assert (fast.steps, fast.alpha) == (1, pytest.approx(0.125))
    assert AdvConfig(method="trades", eps=8 / 255).beta == 6.0
    assert AdvConfig.from_dict(c.to_dict()) == c
    assert AdvConfig(method="fast", eps=0.1, init="prior").alpha == pytest.approx(0.05)
    assert AdvConfig(method="pgd", eps=0.1, init="prior").alpha == pytest.approx(0.05)
    old = {k: v for k, v in c.to_dict().items() if k != "init"}  # written before the field existed
    assert AdvConfig.from_dict(old).init == "random"


@pytest.mark.parametrize("kwargs,message", [
    ({"eps": 0}, "--eps must be in (0, 1]"), ({"eps": 1.5}, "--eps must be in (0, 1]"),
    ({"steps": 0}, "--adv-steps must be an integer >= 1"), ({"method": "trades", "beta": -1}, "--beta must be >= 0"),
    ({"beta": 1.0}, "--beta applies to --adv trades and mart only"), ({"method": "fast", "steps": 3}, "one FGSM step"),
    ({"method": "free"}, "unknown adversarial method"), ({"norm": "l1"}, "unknown norm"),
    ({"eps_warmup": -1}, "--eps-warmup must be >= 0"), ({"val_count": 0}, "--adv-val must be"),
    ({"init": "zero"}, "unknown attack start 'zero'"),
])
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AdvConfig(**{"eps": 0.1, **kwargs})


def test_l2_budgets_above_one_are_valid_training_budgets():
    c = AdvConfig(method="pgd", eps=1.5, norm="l2")
    assert c.eps == 1.5 and c.inner_attack().eps == 1.5
    with pytest.raises(UsageError, match="--eps must be > 0"):
        AdvConfig(method="pgd", eps=0.0, norm="l2")


def test_eps_warmup_rises_linearly_and_scales_the_step():
    c = AdvConfig(method="pgd", eps=0.1, steps=4, eps_warmup=2)
    assert [c.eps_at(p) for p in (0.5, 1.0, 2.0, 5.0)] == pytest.approx([0.025, 0.05, 0.1, 0.1])
    half = c.inner_attack(0.05)
    assert half.eps == pytest.approx(0.05) and half.alpha == pytest.approx(c.alpha / 2)


# -- the inner maximization and the losses ---------------------------------------------------------------------------
def test_kl_pgd_moves_the_prediction_within_the_budget_and_leaves_the_model_alone(trained):
    model, x, y = trained
    res = attacks.KLPGD(eps=0.2, steps=5)(model, x, y)
    assert ((res.x_adv - x).abs().flatten(1).amax(1) <= 0.2 + 1e-6).all()
    assert not model.training and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        kl = nn.functional.kl_div(model(res.x_adv).log_softmax(1), model(x).log_softmax(1), log_target=True,
                                  reduction="none").sum(1)
    assert kl.mean() > 0.05 and res.success.any(), "the KL ascent must move predictions, and flip some"
    assert (res.gradients == 5).all() and (res.queries == 7).all()  # clean reference + 5 steps + final pass


@pytest.mark.parametrize("method", ["pgd", "trades", "fast", "mart"])
def test_every_method_gives_a_finite_differentiable_loss_and_restores_the_mode(trained, method):
    model, x, y = trained
    model.train()
    try:
        trainer = AdversarialTraining(AdvConfig(method=method, eps=0.1, steps=None if method == "fast" else 2), None,
                                      seed=0)
        loss, logits = trainer.loss(model, x, y, BatchPosition(torch.arange(len(y)), 0, 0, 1))
        assert model.training and torch.isfinite(loss) and loss.requires_grad and logits.shape == (len(y), 4)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_training_examples_depend_on_the_sample_not_on_its_batch(trained):
    model, x, y = trained
    trainer = AdversarialTraining(AdvConfig(method="pgd", eps=0.1, steps=2), None, seed=3)
    index = torch.arange(len(y)) + 100
    whole = trainer.adversarial_examples(model, x, y, index, epoch=0, progress=1.0)
    half = trainer.adversarial_examples(model, x[:10], y[:10], index[:10], epoch=0, progress=1.0)
    other_epoch = trainer.adversarial_examples(model, x, y, index, epoch=1, progress=1.0)
    assert torch.allclose(whole[:10], half, atol=1e-6) and not torch.equal(whole, other_epoch)


def test_a_prior_start_goes_on_from_each_images_last_perturbation(trained):
    """init="prior": an image's attack starts from its perturbation of the previous epoch (kept to 1/127 of eps),
    an image without one from the attack's own random draw."""
    model, x, y = trained
    eps = 0.1
    threat = AdvConfig(method="pgd", eps=eps, steps=1, alpha=0.03, init="prior")
    trainer = AdversarialTraining(threat, None, seed=3, train_size=len(y) + 100)
    plain = AdversarialTraining(AdvConfig(method="pgd", eps=eps, steps=1, alpha=0.03), None, seed=3)
    index = torch.arange(len(y)) + 100
    half = len(y) // 2
    first = trainer.adversarial_examples(model, x[:half], y[:half], index[:half], epoch=0, progress=1.0)
    assert torch.equal(first, plain.adversarial_examples(model, x[:half], y[:half], index[:half], 0, 1.0))

    second = trainer.adversarial_examples(model, x, y, index, epoch=1, progress=1.0)
    kept = ((first - x[:half]) / (eps / 127)).round().clamp(-127, 127) * (eps / 127)
    keys = sample_keys(3, index[:half], stream=2)
    expected = threat.inner_attack().perturb(model, x[:half], y[:half], generator=keys, start=kept)
    assert torch.allclose(second[:half], expected, atol=1e-6)
    fresh = plain.adversarial_examples(model, x, y, index, epoch=1, progress=1.0)
    assert torch.equal(second[half:], fresh[half:]), "images without a prior start where the attack would"
    assert not torch.allclose(second[:half], fresh[:half])
    assert ((second - x).abs().amax() <= eps + 1e-6) and second.min() >= 0 and second.max() <= 1


# -- training ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_and_pgd(data):
    train_data, test_data = data
    plain = train(config(), train_data, test_data)
    robust = train(config(), train_data, test_data, adversarial=adv())
    return plain, robust


def test_adversarial_training_raises_robust_accuracy_over_plain_training(plain_and_pgd, data):
    plain, robust = plain_and_pgd
    test = data[1]
    assert plain.metrics["test_accuracy"] >= 0.9, "the task must be learnable"
    plain_robust, adv_robust = robust_accuracy(plain.model, test), robust_accuracy(robust.model, test)
    assert adv_robust >= plain_robust + 0.2, (plain_robust, adv_robust)  # measured: 9 % -> 44 %
    assert robust.metrics["test_accuracy"] >= 0.7


def test_metadata_records_the_threat_model_and_the_kept_epoch_is_the_most_robust(plain_and_pgd):
    _, robust = plain_and_pgd
    meta = robust.meta
    assert meta["adversarial"] == adv().to_dict() and meta["adversarial"]["alpha"] == pytest.approx(2.5 * EPS / 3)
    history = meta["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all({"val_clean_accuracy", "val_robust_accuracy", "val_fgsm_accuracy"} <= set(h) for h in history)
    best = max(history, key=lambda h: h["val_robust_accuracy"])  # the first of equals is kept
    assert meta["kept_epoch"] == best["epoch"] == robust.metrics["kept_epoch"]
    assert robust.metrics["val_robust_accuracy"] == best["val_robust_accuracy"]
    assert "overfitting" in robust.metrics and "adversarial" not in plain_and_pgd[0].meta


def test_the_checkpoint_holds_the_kept_epoch_not_the_last(data, tmp_path, monkeypatch):
    """Force the most robust epoch to be the first: the checkpoint must hold epoch 1's weights."""
    train_data, test_data = data
    real = AdversarialTraining.validate
    seen = []

    def validate(self, model, device):
        stats = real(self, model, device)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {**stats, "val_robust_accuracy": 0.9 if len(seen) == 1 else 0.1}

    monkeypatch.setattr(AdversarialTraining, "validate", validate)
    path = tmp_path / "run.pt"
    result = train(config(epochs=2, limit=160), train_data, test_data, adversarial=adv(), checkpoint=path)
    model, meta = load_model(path)
    assert meta["kept_epoch"] == 1 and result.metrics["kept_epoch"] == 1
    state = model.state_dict()
    assert all(torch.equal(state[k], seen[0][k]) for k in state)
    assert not all(torch.equal(state[k], seen[1][k]) for k in state)
    resume = read_checkpoint(path)["resume"]
    assert all(torch.equal(resume["model"][k], seen[1][k]) for k in state), "resume continues from the last epoch"


def test_same_seed_same_metrics_other_seed_other_metrics(data):
    train_data, test_data = data
    cfg, threat = config(epochs=1, limit=96), adv(method="trades", val_count=64)
    runs = [train(cfg, train_data, test_data, adversarial=threat, device="cpu") for _ in range(2)]
    other = train(config(epochs=1, limit=96, seed=1), train_data, test_data, adversarial=threat)
    assert runs[0].meta["history"][0]["train_loss"] == runs[1].meta["history"][0]["train_loss"]
    assert runs[0].metrics == runs[1].metrics
    assert other.meta["history"][0]["train_loss"] != runs[0].meta["history"][0]["train_loss"]


@pytest.mark.parametrize("threat,ema", [(adv(method="mart", eps_warmup=1.5, val_count=64), None),
                                        (adv(method="fast", steps=None, init="prior", val_count=64), None),
                                        (adv(method="pgd", val_count=64), 0.9)], ids=["mart", "prior", "pgd+ema"])
def test_resume_of_an_adversarial_run_ends_like_an_uninterrupted_one(data, tmp_path, monkeypatch, threat, ema):
    train_data, test_data = data
    cfg = config(epochs=3, limit=96, ema=ema)
    whole = train(cfg, train_data, test_data, adversarial=threat, checkpoint=tmp_path / "whole.pt")

    real_epoch = train_module._run_epoch

    def stop_in_epoch_three(run, data_, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(run, data_, epoch, *args)

    monkeypatch.setattr(train_module, "_run_epoch", stop_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, train_data, test_data, adversarial=threat, checkpoint=tmp_path / "part.pt")
    monkeypatch.setattr(train_module, "_run_epoch", real_epoch)
    with pytest.raises(Exception, match="other options"):
        train(cfg, train_data, test_data, adversarial=adv(method="pgd"), checkpoint=tmp_path / "part.pt", resume=True)
    interrupted = read_checkpoint(tmp_path / "part.pt")["resume"]
    assert ("adversarial" in interrupted) == (threat.init == "prior")
    if threat.init == "prior":
        assert interrupted["adversarial"]["prior"].dtype == torch.int8
        assert int(interrupted["adversarial"]["has_prior"].sum()) == 96
        assert "adversarial" not in read_checkpoint(tmp_path / "whole.pt")["resume"], "a finished run drops it"
    resumed = train(cfg, train_data, test_data, adversarial=threat, checkpoint=tmp_path / "part.pt", resume=True)
    assert resumed.metrics == whole.metrics
    assert resumed.meta["history"][-1]["train_loss"] == whole.meta["history"][-1]["train_loss"]
    assert resumed.meta["kept_epoch"] == whole.meta["kept_epoch"]
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_prior_start_refuses_to_run_distributed(data):
    train_data, test_data = data
    with pytest.raises(UsageError, match="run it in one process"):
        train(config(epochs=1, limit=96), train_data, test_data, dist=DistContext(rank=0, world_size=2),
              adversarial=adv(method="fast", steps=None, init="prior"))


# -- catastrophic overfitting --------------------------------------------------------------------------------------
def epoch(n, pgd, fgsm):
    return {"epoch": n, "val_robust_accuracy": pgd, "val_fgsm_accuracy": fgsm, "val_clean_accuracy": 0.85}


def test_overfitting_is_a_pgd_collapse_while_fgsm_holds():
    healthy = [epoch(1, 0.55, 0.62), epoch(2, 0.63, 0.70), epoch(3, 0.66, 0.72)]
    assert all(overfitting(healthy[: i + 1]) is None for i in range(3))
    collapsed = overfitting([*healthy, epoch(4, 0.05, 0.81)])
    assert collapsed is not None and "epoch 4" in collapsed and "66.0%" in collapsed
    assert overfitting([epoch(1, 0.02, 0.70)]) is not None, "a large FGSM-PGD gap alone is a sign too"
    assert overfitting([*healthy, epoch(4, 0.20, 0.30)]) is None, "both falling is not overfitting"
    assert overfitting([epoch(1, 0.01, 0.03)]) is None, "a model robust to nothing is not overfitting either"


def test_fast_training_with_a_huge_step_is_caught_and_reported(data, monkeypatch):
    """Fast AT overfits catastrophically when its examples stop being adversarial: simulate that (FGSM accuracy
    rising while PGD accuracy collapses) and check the run records and survives it, keeping the robust epoch."""
    train_data, test_data = data
    real = AdversarialTraining.validate
    calls = []

    def validate(self, model, device):
        stats = real(self, model, device)
        calls.append(1)
        if len(calls) == 2:
            stats.update(val_robust_accuracy=0.01, val_fgsm_accuracy=0.95)
        else:
            stats.update(val_robust_accuracy=0.6, val_fgsm_accuracy=0.7)
        return stats

    monkeypatch.setattr(AdversarialTraining, "validate", validate)
    result = train(config(epochs=2, limit=160), train_data, test_data, adversarial=adv(method="fast", steps=None))
    assert result.meta["overfitting"][0]["epoch"] == 2 and result.meta["kept_epoch"] == 1
    assert "catastrophic overfitting at epoch 2" in result.metrics["overfitting"]
    assert result.meta["history"][1]["overfitting"] and result.meta["history"][0]["overfitting"] is None


# -- the command line ----------------------------------------------------------------------------------------------
QUICK = ("--dataset", "shapes", "--model", "lenet5", "--limit", "192", "--epochs", "1", "--batch-size", "64",
         "--device", "cpu", "--adv-val", "64")


def test_cli_trains_adversarially_and_reports_the_threat_model(isolated):
    result = run_cli("train", *QUICK, "--adv", "trades", "--adv-steps", "2", "--eps", "8/255",
                     "--out", str(isolated / "runs"), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["checkpoint"].endswith("shapes-lenet5-trades.pt"), "an adversarial run does not overwrite a plain one"
    assert doc["adversarial"]["method"] == "trades" and doc["adversarial"]["eps"] == pytest.approx(8 / 255)
    assert doc["adversarial"]["beta"] == 6.0 and doc["kept_epoch"] == 1 and doc["overfitting"] == []
    assert {"test_accuracy", "val_robust_accuracy", "kept_epoch", "overfitting"} <= set(doc["metrics"])
    human = run_cli("train", *QUICK, "--adv", "fast", "--adv-init", "prior", "--out", str(isolated / "runs"))
    assert human.exit_code == 0, human.stderr
    assert "robust accuracy" in human.stdout and "kept epoch" in human.stdout and "fast: Linf eps" in human.stdout
    assert "FGSM from the previous" in human.stdout and "alpha 0.01569" in human.stdout  # 0.5 * 8/255
    assert "epoch 1/1" in human.stderr and "held-out accuracy clean" in human.stderr


class NoGradients(nn.Module):
    """A model whose outputs carry no input gradient (e.g. a quantizing front end)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).detach()


BAD_ADV = {
    "zero eps": (["--adv", "pgd", "--eps", "0"], "--eps must be > 0"),
    "eps above one": (["--adv", "pgd", "--eps", "1.5"], "eps must be <= 1"),
    "zero steps": (["--adv", "pgd", "--adv-steps", "0"], "--adv-steps must be an integer >= 1"),
    "negative beta": (["--adv", "trades", "--beta", "-1"], "--beta must be >= 0"),
    "unknown method": (["--adv", "pgdd"], "did you mean 'pgd'"),
    "eps without adv": (["--eps", "0.1"], "--eps only applies to adversarial training"),
    "beta with pgd": (["--adv", "pgd", "--beta", "2"], "--beta applies to --adv trades and mart only"),
    "l2 without eps": (["--adv", "pgd", "--adv-norm", "l2"], "needs an explicit --eps"),
    "init without adv": (["--adv-init", "prior"], "--adv-init only applies to adversarial training"),
    "unknown init": (["--adv", "fast", "--adv-init", "zero"], "unknown attack start 'zero'"),
}


@pytest.mark.parametrize("args,message", BAD_ADV.values(), ids=BAD_ADV.keys())
def test_bad_adversarial_options_exit_2_with_one_line(isolated, args, message):
    line = assert_one_line_error(run_cli("train", *QUICK[:-2], *args, "--out", str(isolated / "runs")), 2)
    assert message in line
    assert not (isolated / "runs").exists()


def test_a_model_without_gradients_is_refused_for_adversarial_training(isolated, monkeypatch):
    real = train_module.build_model
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: NoGradients(real(*a, **k)))
    line = assert_one_line_error(run_cli("train", *QUICK, "--adv", "pgd", "--out", str(isolated / "runs")), 2)
    assert "needs a model with input gradients" in line
