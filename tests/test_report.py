"""`robustcnn report` and the report runner: cascade, files, resume, sanity checks, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import attacks
from robustcnn.report import USUAL_EPS
from cli.options import parse_eps_list
from robustcnn.report import ReportRequest, run_report
from train_fixtures import assert_one_line_error, isolated, run_cli  # noqa: F401  (fixtures)


def _report(tmp_path, *extra):
    out = tmp_path / "rep"
    result = run_cli("report", "--attacks", "fgsm,pgd", "--eps", "0,0.05,0.3", "--n", "48", "--out", str(out),
                     "--json", *extra)
    return out, result


def test_report_files_and_worst_case(newest, tmp_path):
    out, result = _report(tmp_path, "--each-alone")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    for f in ("report.json", "report.md", "accuracy_vs_eps.png", "gallery.png", "report.html"):
        assert (out / f).stat().st_size > 0, f
    assert not (out / "state.pt").exists()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(doc["results"]))
    accs = [r["robust_accuracy"] for r in sorted(doc["results"], key=lambda r: r["eps"])]
    assert accs[0] == doc["clean_accuracy"] and accs == sorted(accs, reverse=True)
    # the worst case is at most the accuracy under every single attack, each run alone on all samples; the
    # report's own "alone" numbers are exactly those stand-alone runs
    for r in doc["results"]:
        if r["eps"] == 0:  # nothing may be perturbed: no attack runs
            assert r["attacks"] == [] and r["robust_accuracy"] == doc["clean_accuracy"]
            continue
        for i, name in enumerate(("fgsm", "pgd")):
            alone = json.loads(run_cli("attack", "--method", name, "--eps", str(r["eps"]), "--n", "48",
                                       "--json").stdout)["results"][0]["robust_accuracy"]
            assert r["robust_accuracy"] <= alone + 1e-9
            assert r["accuracy_alone"][i] == pytest.approx(alone)
    assert "worst-case robust accuracy" in (out / "report.md").read_text()
    assert doc["request"]["checkpoint_sha256"] and "torch" in doc["versions"]


def test_a_budget_of_zero_runs_no_attack_even_in_a_suite_that_needs_a_positive_one(newest, tmp_path):
    out = tmp_path / "rep"
    result = run_cli("report", "--eps", "0,0.05", "--n", "16", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    zero, five = sorted(json.loads(result.stdout)["results"], key=lambda r: r["eps"])
    assert zero["attacks"] == [] and zero["robust_accuracy"] == json.loads(result.stdout)["clean_accuracy"]
    assert [a["name"] for a in five["attacks"]][:2] == ["apgd", "apgd-t"]
    assert "no attack runs" in (out / "report.md").read_text()
    assert "no attack runs" in (out / "report.html").read_text()
    only_zero = run_cli("report", "--eps", "0", "--n", "16", "--out", str(tmp_path / "zero"), "--json")
    assert only_zero.exit_code == 0, only_zero.stderr
    (row,) = json.loads(only_zero.stdout)["results"]
    assert row["attacks"] == [] and row["robust_accuracy"] == json.loads(only_zero.stdout)["clean_accuracy"]
    bad = run_cli("report", "--suite", "nosuch", "--eps", "0", "--n", "16", "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2  # names are checked even where no attack runs


def test_l2_report_accepts_budgets_above_one(newest, tmp_path):
    result = run_cli("report", "--attacks", "fgsm", "--norm", "l2", "--eps", "1.5", "--n", "8", "--out",
                     str(tmp_path / "rep"), "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["results"]
    assert row["eps"] == 1.5


def test_default_budgets_are_valid_for_their_norm():
    for norm, per_dataset in USUAL_EPS.items():
        for text in per_dataset.values():
            assert parse_eps_list(text, norm)


def test_fail_under_exits_1_after_writing(newest, tmp_path):
    out, result = _report(tmp_path, "--fail-under", "0.99")
    assert result.exit_code == 1 and "below --fail-under" in result.stderr
    assert (out / "report.json").exists()


def _tiny_setup(newest):
    from robustcnn.checkpoint import latest_checkpoint, load_model
    from robustcnn.data import load_dataset
    from robustcnn.report import file_sha256

    path = latest_checkpoint()
    model, meta = load_model(path)
    data = load_dataset(meta["dataset"], train=False)
    x, y = data.images[:24].float() / 255, data.labels[:24]
    req = ReportRequest(suite=None, attacks=["fgsm", "pgd"], eps=[0.05, 0.3], norm="linf", n=24, seed=0,
                        checkpoint_sha256=file_sha256(path), dataset=meta["dataset"], each_alone=True)
    return model, x, y, req


def test_each_alone_is_opt_in_and_passes_add_up(newest, tmp_path):
    """Without ``each_alone`` only the cascade runs (no accuracy alone after the first attack, no passes spent on
    it); with it, the extra runs show in ``passes["alone"]``. The total is the sum of its parts either way."""
    model, x, y, req = _tiny_setup(newest)
    runs = {}
    for each in (False, True):
        runs[each], _ = run_report(model, x, y, ReportRequest(**{**req.__dict__, "each_alone": each}),
                                   tmp_path / str(each), device=torch.device("cpu"), batch_size=16)
    for doc in runs.values():
        p = doc["passes"]
        assert p["total"] == {d: sum(v[d] for k, v in p.items() if k != "total") for d in ("forward", "backward")}
        assert p["suite"]["backward"] > 0 and p["clean"] == {"forward": len(y), "backward": 0}
    assert runs[False]["passes"]["alone"] == {"forward": 0, "backward": 0}
    assert runs[True]["passes"]["alone"]["forward"] > 0
    first, second = runs[False]["results"][1]["accuracy_alone"]
    assert first == runs[True]["results"][1]["accuracy_alone"][0] and second != second  # NaN: not measured
    assert runs[True]["results"][1]["accuracy_alone"][1] >= runs[True]["results"][1]["robust_accuracy"]
    assert [r["per_sample"] for r in runs[False]["results"]] == [r["per_sample"] for r in runs[True]["results"]]


def _interrupt_after(stages: int):
    """An ``on_stage`` callback that interrupts the report once ``stages`` stages ran and were saved."""
    saved = []

    def on_stage(key: str) -> None:
        saved.append(key)
        if len(saved) == stages:
            raise KeyboardInterrupt

    return on_stage


def test_interrupted_report_resumes_to_the_same_result(newest, tmp_path):
    model, x, y, req = _tiny_setup(newest)
    full, _ = run_report(model, x, y, req, tmp_path / "a", device=torch.device("cpu"), batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        run_report(model, x, y, req, tmp_path / "b", device=torch.device("cpu"), batch_size=16,
                   on_stage=_interrupt_after(2))
    assert (tmp_path / "b" / "state.pt").exists()
    calls = []
    resumed, _ = run_report(model, x, y, req, tmp_path / "b", device=torch.device("cpu"), batch_size=16,
                            progress=lambda name, done, total: calls.append(name))
    assert len(set(calls)) <= 2 and calls.count("fgsm") + calls.count("pgd") > 0  # only the unfinished stages ran
    for a, b in zip(full["results"], resumed["results"]):
        assert a["per_sample"] == b["per_sample"] and a["robust_accuracy"] == b["robust_accuracy"]
        assert a["accuracy_after"] == b["accuracy_after"] and a["accuracy_alone"] == b["accuracy_alone"]


def test_resuming_with_another_request_is_refused_and_keeps_the_state(newest, tmp_path):
    model, x, y, req = _tiny_setup(newest)
    with pytest.raises(KeyboardInterrupt):
        run_report(model, x, y, req, tmp_path / "r", device=torch.device("cpu"), batch_size=16,
                   on_stage=_interrupt_after(1))
    before = (tmp_path / "r" / "state.pt").read_bytes()
    other = ReportRequest(**{**req.__dict__, "checkpoint_sha256": "0" * 64})
    with pytest.raises(ValueError, match="another model"):
        run_report(model, x, y, other, tmp_path / "r", device=torch.device("cpu"), batch_size=16)
    assert (tmp_path / "r" / "state.pt").read_bytes() == before


def test_gradient_masking_is_flagged(newest, tmp_path):
    """A model that hides its gradients behind a hard threshold: the unbounded-attack check must notice."""
    model, x, y, req = _tiny_setup(newest)

    class Masked(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inp):
            q = (inp > 0.5).float()  # zero gradient almost everywhere
            return self.inner(q + (inp - inp.detach()) * 0)

    masked = Masked(model).eval()
    x, y = x[:8], y[:8]
    doc, _ = run_report(masked, x, y, ReportRequest(**{**req.__dict__, "n": 8, "eps": [0.3]}), tmp_path / "m",
                        device=torch.device("cpu"), batch_size=16)
    text = " ".join(doc["warnings"])
    assert "zero" in text or "gradient masking" in text


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("--suite", "nope"), 2, "unknown suite"),
        (("--attacks", "fgsm,nope"), 2, "unknown attack"),
        (("--attacks", ","), 2, "at least one attack"),
        (("--eps", ""), 2, "at least one value"),
        (("--eps", "0.1,abc"), 2, "invalid eps"),
        (("--norm", "l7"), 2, "--norm must be"),
        (("--fail-under", "3"), 2, "--fail-under"),
    ],
)
def test_bad_report_input(newest, tmp_path, args, code, message):
    line = assert_one_line_error(run_cli("report", "--n", "8", "--out", str(tmp_path / "o"), *args), code)
    assert message in line


def test_out_that_is_a_file_is_refused_and_kept(newest, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    assert_one_line_error(run_cli("report", "--n", "8", "--suite", "quick", "--out", str(f)), 2)
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("fgsm, pgd, flagged", [(0.8, 0.2, True), (0.9, 0.85, False), (0.3, 0.1, False),
                                                (0.95, 0.94, False)])
def test_single_step_masking_is_flagged(monkeypatch, fgsm, pgd, flagged):
    """FGSM leaving far more accuracy than PGD-10 (catastrophic overfitting) gets a warning; small gaps do not."""
    import robustcnn.report as report

    class Fake:
        def __init__(self, acc):
            self.robust_accuracy = acc
            self.passes = {"forward": 3, "backward": 1}

    def fake_evaluate(model, data, attack_list, **kw):
        (atk,) = attack_list
        if isinstance(atk, attacks.FGSM):
            return Fake(fgsm)
        return Fake(0.0 if atk.eps >= 1 else pgd)

    monkeypatch.setattr(report.attacks, "evaluate", fake_evaluate)
    monkeypatch.setattr(report, "correctly_classified", lambda model, x, y, **kw: torch.ones(len(y), dtype=torch.bool))
    x, y = torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    notes, passes = report.attack_checks(torch.nn.Identity(), x, y, eps=0.1, norm="linf",
                                         device=torch.device("cpu"), seed=0, batch_size=8)
    assert any("FGSM leaves" in n for n in notes) == flagged, notes
    assert passes == [4 * 3 + len(y), 4]  # four probe attacks, and the clean pass
