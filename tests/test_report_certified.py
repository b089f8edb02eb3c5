"""The report's proven lower bound: IBP-certified accuracy beside the attacked accuracy, soundness errors listed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustcnn.certify import verified
from robustcnn.report import certify_results, render_markdown
from train_fixtures import isolated, run_cli  # noqa: F401  (fixtures)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()


def test_certified_counts_only_verified_and_unfooled_and_lists_soundness_errors():
    model = _model()
    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1).detach()
    proven = verified(model, x, y, 0.01)
    assert proven.sum() >= 2
    robust = proven.clone()
    first = int(proven.nonzero()[0])
    robust[first] = False  # pretend an attack fooled a verified sample
    results = [{"eps": 0.01, "per_sample": {"robust": robust.tolist()}}]
    info = certify_results(model, x, y, results, "linf", device=torch.device("cpu"), batch_size=16)
    assert info == {"method": "ibp", "reason": None}
    assert results[0]["soundness_errors"] == [first]
    assert results[0]["certified_accuracy"] == pytest.approx((int(proven.sum()) - 1) / 40)


def test_certified_is_none_with_a_reason_for_l2_or_unsupported_layers():
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    results = [{"eps": 0.5, "per_sample": {"robust": [True] * 4}}]
    assert "linf" in certify_results(_model(), x, y, results, "l2", device=torch.device("cpu"), batch_size=4)["reason"]
    assert results[0]["certified_accuracy"] is None and results[0]["soundness_errors"] == []
    odd = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.GELU(), nn.Linear(3, 3))
    assert "GELU" in certify_results(odd, x, y, results, "linf", device=torch.device("cpu"), batch_size=4)["reason"]


def test_report_sets_certified_beside_attacked(newest, tmp_path):
    out = tmp_path / "rep"
    result = run_cli("report", "--attacks", "fgsm,pgd", "--eps", "0,0.01", "--n", "24", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["certified"] == {"method": "ibp", "reason": None}
    for r in doc["results"]:
        assert r["soundness_errors"] == []
        assert 0 <= r["certified_accuracy"] <= r["robust_accuracy"]
    assert "IBP-certified accuracy" in (out / "report.md").read_text()
    assert "IBP-certified" in render_markdown(doc)
