"""Slow: really trains the default model on the real Fashion-MNIST for one epoch (`python -m pytest -m slow`)."""

from __future__ import annotations

import json

import pytest

from robustcnn.data import load_dataset
from robustcnn.errors import DataNotFoundError
from train_fixtures import isolated, run_cli  # noqa: F401  (fixtures)


@pytest.mark.slow
def test_one_epoch_on_real_fashion_mnist(isolated):
    try:
        load_dataset("fashion-mnist", train=False, download=False)
    except DataNotFoundError as exc:
        pytest.skip(f"no Fashion-MNIST files here ({exc})")
    result = run_cli("train", "--epochs", "1", "--device", "cpu", "--out", str(isolated / "runs"), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["dataset"] == "fashion-mnist" and doc["metrics"]["test_count"] == 10_000
    assert doc["metrics"]["test_accuracy"] > 0.85  # one epoch of the default model; chance is 0.10
    evaluated = json.loads(run_cli("eval", "--json", "--device", "cpu").stdout)
    assert evaluated["accuracy"] == pytest.approx(doc["metrics"]["test_accuracy"], abs=1e-6)
