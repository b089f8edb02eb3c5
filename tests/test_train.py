"""The training core: config validation, learning, determinism, resume == uninterrupted, the batch hook."""

from __future__ import annotations

import platform

import pytest
import torch

from robustcnn.checkpoint import read_checkpoint
from robustcnn.errors import CheckpointError, UsageError
from robustcnn.perf import keep_freed_memory
from robustcnn.train import TrainConfig, _lr_factor, _Run, evaluate, train
from train_fixtures import shapes, tiny_config, tiny_train


@pytest.mark.parametrize("field,value", [("epochs", 0), ("epochs", -1), ("batch_size", 0), ("lr", 0.0),
                                         ("lr", -0.1), ("lr", float("nan")), ("limit", 0)])
def test_non_positive_numbers_are_refused(field, value):
    with pytest.raises(UsageError, match="must be > 0"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field,value,hint", [("model", "lenet", "lenet5"), ("dataset", "cifar", "cifar10"),
                                              ("optimizer", "adm", "adam")])
def test_unknown_names_are_refused_with_a_suggestion(field, value, hint):
    with pytest.raises(UsageError, match=f"did you mean '{hint}'"):
        TrainConfig(**{field: value})


def test_config_resolves_defaults_and_round_trips_as_a_plain_dict():
    sgd, adam = TrainConfig(), TrainConfig(optimizer="ADAM")
    assert sgd.lr == 0.05 and adam.lr == 0.002 and adam.optimizer == "adam"
    assert sgd.arch_args and TrainConfig.from_dict(sgd.to_dict()) == sgd
    assert all(isinstance(v, (int, float, str, bool, dict, type(None))) for v in sgd.to_dict().values())
    with pytest.raises(UsageError, match="no argument"):
        TrainConfig(model="simple", arch_args={"blocks": 3})


def test_one_cycle_schedule_warms_up_then_anneals():
    f = [_lr_factor(s, total=100, schedule="onecycle", warmup=0.2) for s in range(101)]
    assert f[0] < 0.1 and max(f) == f[20] == 1.0 and f[100] < 1e-6
    assert all(a <= b for a, b in zip(f[:20], f[1:21])) and all(a >= b for a, b in zip(f[20:], f[21:]))
    assert _lr_factor(50, total=100, schedule="constant", warmup=0.2) == 1.0


def test_training_learns_the_shapes_task():
    config = TrainConfig(model="vgg", dataset="shapes", epochs=4, batch_size=32, arch_args={"width": 8})
    result = train(config, shapes(600, 1), shapes(200, 2))
    assert result.metrics["test_accuracy"] > 0.6  # chance is 1/6; measured 0.9
    assert not result.model.training
    history = result.meta["history"]
    assert len(history) == 4 and history[-1]["train_loss"] < history[0]["train_loss"]


def test_same_seed_gives_identical_results_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = tiny_train(), tiny_train()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.metrics == second.metrics
    for (k, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), k
    other = tiny_train(seed=1)
    assert not torch.equal(other.model.state_dict()["head.1.weight"], first.model.state_dict()["head.1.weight"])


def test_augmented_training_is_deterministic_too():
    assert tiny_train(augment=True, epochs=1).metrics == tiny_train(augment=True, epochs=1).metrics


def test_moving_average_follows_the_weights_with_the_early_decay_and_averages_batch_norm_statistics():
    run = _Run(tiny_config(model="vgg", ema=0.99), shapes(64, 1), torch.device("cpu"))
    start = {k: v.clone() for k, v in run.ema.state_dict().items()}
    with torch.no_grad():
        for t in (*run.model.parameters(), *run.model.buffers()):
            t.add_(1)
    run._update_ema()  # first step: decay min(0.99, 1/10), so the average moves 9/10 of the way
    ema, live = run.ema.state_dict(), run.model.state_dict()
    for k, v in ema.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, start[k] + 0.9 * (live[k] - start[k]))
        else:
            assert torch.equal(v, live[k]), k  # counters are copied
    assert any("running_mean" in k for k in ema), "the test needs batch-norm statistics"
    before = {k: v.clone() for k, v in ema.items()}
    run._update_ema()  # second: decay 2/11
    torch.testing.assert_close(ema["head.3.weight"], before["head.3.weight"]
                               + 9 / 11 * (live["head.3.weight"] - before["head.3.weight"]))
    assert not any(p.requires_grad for p in run.ema.parameters())


def test_a_run_with_a_moving_average_ships_the_average(tmp_path):
    plain, ema = tiny_train(), tiny_train(checkpoint=tmp_path / "ema.pt", ema=0.9)
    saved = read_checkpoint(tmp_path / "ema.pt")
    for k, v in ema.model.state_dict().items():
        assert torch.equal(saved["model"][k], v), k  # the checkpoint holds the average ...
    assert not torch.equal(saved["resume"]["model"]["head.1.weight"], saved["model"]["head.1.weight"])  # ... apart
    assert not torch.equal(plain.model.state_dict()["head.1.weight"], ema.model.state_dict()["head.1.weight"])
    # a decay near zero: the average is the weights themselves, to the bit
    nearly_none = tiny_train(ema=1e-12)
    for (k, a), b in zip(plain.model.state_dict().items(), nearly_none.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert nearly_none.metrics == plain.metrics


@pytest.mark.parametrize("ema", [None, 0.9], ids=["weights", "moving average"])
def test_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path, ema):
    config = tiny_config(epochs=3, augment=True, ema=ema)
    whole = train(config, shapes(192, 1), shapes(64, 2), checkpoint=tmp_path / "whole.pt")

    def stop_after_first_epoch(stats):
        raise KeyboardInterrupt

    part = tmp_path / "part.pt"
    with pytest.raises(KeyboardInterrupt):
        train(config, shapes(192, 1), shapes(64, 2), checkpoint=part, on_epoch=stop_after_first_epoch)
    saved = read_checkpoint(part)
    assert saved["resume"]["epoch"] == 1 and not saved["meta"]["complete"]
    resumed = train(config, shapes(192, 1), shapes(64, 2), checkpoint=part, resume=True)
    assert resumed.metrics == whole.metrics
    assert [h["train_loss"] for h in resumed.meta["history"]] == [h["train_loss"] for h in whole.meta["history"]]
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_refuses_other_options_and_missing_files(tmp_path):
    path = tmp_path / "run.pt"
    tiny_train(checkpoint=path, epochs=1)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="lr 0.05 -> 0.1"):
        train(tiny_config(epochs=1, lr=0.1), shapes(192, 1), shapes(64, 2), checkpoint=path, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(), shapes(192, 1), shapes(64, 2), checkpoint=tmp_path / "none.pt", resume=True)
    assert path.read_bytes() == before


def test_batch_hook_replaces_the_training_batch():
    calls = []

    def all_zero_labels(model, x, y):
        calls.append((model.training, x.dtype, float(x.min()), float(x.max())))
        return x, torch.zeros_like(y)

    config = tiny_config(epochs=2, optimizer="adam")
    test = shapes(64, 2)
    result = train(config, shapes(192, 1), test, make_batch=all_zero_labels)
    assert len(calls) == 2 * (192 // 32)
    assert all(training and dtype == torch.float32 and 0 <= lo and hi <= 1 for training, dtype, lo, hi in calls)
    predicted_zero = result.metrics["per_class_accuracy"][test.classes[0]]
    assert predicted_zero == 1.0 and result.metrics["test_accuracy"] == pytest.approx(float((test.labels == 0).float().mean()))


def test_evaluate_reports_per_class_accuracy_and_restores_mode():
    result = tiny_train()
    data = shapes(64, 2)
    result.model.train()
    ev = evaluate(result.model, data, batch_size=7)
    assert result.model.training
    counts = torch.bincount(data.labels, minlength=len(data.classes)).tolist()
    weighted = sum(ev.per_class_accuracy[name] * n for name, n in zip(data.classes, counts)) / len(data)
    assert ev.count == 64 and ev.accuracy == pytest.approx(weighted) and ev.accuracy == result.metrics["test_accuracy"]


def test_data_must_match_the_config():
    with pytest.raises(UsageError, match="dataset"):
        train(tiny_config(dataset="mnist"), shapes(64, 1), shapes(64, 2))


def test_allocator_setting_is_applied_with_glibc_and_changes_no_result():
    before = tiny_train(epochs=1).metrics
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
    assert tiny_train(epochs=1).metrics == before
