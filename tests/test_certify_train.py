"""Training for certification: Gaussian-noise training (randomized smoothing) and IBP training (Gowal et al.)."""

from __future__ import annotations

import pytest
import torch

from robustcnn.advtrain import IBP_RAMP_EPOCHS, AdvConfig
from robustcnn.certify import verified
from robustcnn.errors import UsageError
from robustcnn.train import TrainConfig, train
from test_advtrain import config, stripes


@pytest.fixture(scope="module")
def data():
    return stripes(640, 1), stripes(200, 2)


def _verified_accuracy(model, test, eps):
    return float(verified(model, test.images.float() / 255, test.labels, eps).float().mean())


def test_ibp_config_has_its_ramp_and_refuses_attack_options():
    c = AdvConfig(method="ibp", eps=0.1)
    assert (c.steps, c.alpha, c.beta, c.eps_warmup) == (None, None, None, IBP_RAMP_EPOCHS)
    assert AdvConfig.from_dict(c.to_dict()) == c
    assert c.ibp_schedule(0.0) == (0.0, 1.0)  # warm-up: natural training
    assert c.ibp_schedule(0.2 * IBP_RAMP_EPOCHS + 0.4 * IBP_RAMP_EPOCHS) == pytest.approx((0.05, 0.75))
    assert c.ibp_schedule(IBP_RAMP_EPOCHS + 3) == (0.1, 0.5)
    assert AdvConfig(method="ibp", eps=0.1, eps_warmup=2).ibp_schedule(1.0) == pytest.approx((0.0375, 0.8125))
    for kwargs, flag in (({"steps": 3}, "--adv-steps"), ({"alpha": 0.1}, "--adv-alpha"), ({"beta": 1.0}, "--beta"),
                         ({"init": "prior"}, "--adv-init"), ({"norm": "l2"}, "Linf")):
        with pytest.raises(UsageError, match=flag):
            AdvConfig(method="ibp", eps=0.1, **kwargs)


def test_ibp_training_verifies_what_plain_training_does_not(data):
    train_data, test_data = data
    eps = 0.05
    cfg = config(epochs=3, lr=0.01)
    plain = train(cfg, train_data, test_data).model
    ibp = train(cfg, train_data, test_data,
                adversarial=AdvConfig(method="ibp", eps=eps, eps_warmup=2, val_count=128)).model
    result = train(cfg, train_data, test_data, adversarial=AdvConfig(method="ibp", eps=eps, eps_warmup=2,
                                                                     val_count=128))
    assert result.meta["adversarial"]["method"] == "ibp"
    assert all("val_verified_accuracy" in h for h in result.meta["history"])
    best = max(result.meta["history"], key=lambda h: h["val_verified_accuracy"])
    assert result.meta["kept_epoch"] == best["epoch"]  # kept by verified accuracy, not PGD accuracy
    assert result.metrics["val_verified_accuracy"] == best["val_verified_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(ibp.state_dict().values(), result.model.state_dict().values()))
    got, baseline = _verified_accuracy(ibp, test_data, eps), _verified_accuracy(plain, test_data, eps)
    assert got >= 0.5 and got >= baseline + 0.3, (got, baseline)


def test_ibp_refuses_a_model_it_cannot_bound(data, monkeypatch):
    import robustcnn.advtrain as advtrain

    def refuse(model):
        raise ValueError("interval bounds do not support the layer Mystery")

    monkeypatch.setattr(advtrain, "check_supported", refuse)
    with pytest.raises(UsageError, match="--adv ibp: .*Mystery"):
        train(config(epochs=1), *data, adversarial=AdvConfig(method="ibp", eps=0.05, val_count=128))


def test_gaussian_noise_training_is_recorded_seeded_and_changes_the_run(data):
    train_data, test_data = data
    noisy = [train(config(epochs=1, noise_sigma=0.25), train_data, test_data) for _ in range(2)]
    clean = train(config(epochs=1), train_data, test_data)
    assert noisy[0].meta["config"]["noise_sigma"] == 0.25 and clean.meta["config"]["noise_sigma"] is None
    same = [torch.equal(a, b) for a, b in zip(noisy[0].model.state_dict().values(), noisy[1].model.state_dict().values())]
    other = [torch.equal(a, b) for a, b in zip(noisy[0].model.state_dict().values(), clean.model.state_dict().values())]
    assert all(same) and not all(other)
    assert TrainConfig.from_dict(noisy[0].meta["config"]) == config(epochs=1, noise_sigma=0.25)


@pytest.mark.parametrize("sigma", [0, -0.5, float("nan"), True])
def test_noise_sigma_must_be_positive(sigma):
    with pytest.raises(UsageError, match="--sigma"):
        config(noise_sigma=sigma)
