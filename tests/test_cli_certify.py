"""`robustcnn certify`: randomized smoothing and IBP through the CLI, its outputs and its one-line errors."""

from __future__ import annotations

import json

import pytest

from robustcnn.train import train
from robustcnn.data import make_shapes
from train_fixtures import assert_one_line_error, isolated, run_cli, tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny shapes models trained for one epoch: one with Gaussian noise (sigma 0.25), one plain."""
    root = tmp_path_factory.mktemp("certify-models")
    paths = {}
    for name, noise in (("noisy", 0.25), ("plain", None)):
        paths[name] = root / f"{name}.pt"
        train(tiny_config(model="simple", epochs=1, arch_args={"width": 4, "hidden": 16}, noise_sigma=noise),
              make_shapes(192, seed=1), make_shapes(64, seed=2), checkpoint=paths[name])
    return paths


def _json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_smoothing_reports_radii_per_image_and_is_seeded(checkpoints, isolated):
    args = ("certify", "-c", str(checkpoints["noisy"]), "-n", "3", "--samples", "300", "--n0", "20", "--radii",
            "0,0.1,0.5", "--device", "cpu", "--json", "--per-sample")
    doc = _json(run_cli(*args))
    assert doc["method"] == "smoothing" and doc["norm"] == "l2" and doc["sigma"] == 0.25  # sigma from the checkpoint
    assert [r["radius"] for r in doc["certified_accuracy"]] == [0, 0.1, 0.5]
    rows = doc["per_sample"]
    assert len(rows) == 3 and [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert (r["prediction"] is None) == (r["radius"] == 0.0)
        assert r["correct"] == (r["prediction"] == r["label"])
    accs = [r["accuracy"] for r in doc["certified_accuracy"]]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] == sum(r["correct"] and r["radius"] >= 0 for r in rows) / 3
    again = _json(run_cli(*args))
    assert again["per_sample"] == rows


def test_ibp_reports_verified_beside_attacked_and_plots(checkpoints, isolated):
    png = isolated / "ibp.png"
    doc = _json(run_cli("certify", "--method", "ibp", "-c", str(checkpoints["plain"]), "-n", "20", "--eps",
                        "0,0.01", "--device", "cpu", "--json", "--per-sample", "--plot", str(png)))
    assert png.read_bytes()[:4] == b"\x89PNG"
    zero, small = doc["results"]
    assert zero["eps"] == 0 and zero["verified_accuracy"] <= zero["clean_accuracy"]
    assert small["verified_accuracy"] <= small["attacked_accuracy"] <= small["clean_accuracy"]
    assert zero["soundness_errors"] == [] and small["soundness_errors"] == []
    assert len(doc["per_sample"]) == 20 and set(doc["per_sample"][0]["verified"]) == {"0", "0.01"}


def test_smoothing_table_on_the_terminal(checkpoints, isolated):
    result = run_cli("certify", "-c", str(checkpoints["noisy"]), "-n", "2", "--samples", "100", "--n0", "10",
                     "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "certified accuracy" in result.stdout and "L2 radius" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--sigma", "0"), "--sigma must be > 0"),
    (("--sigma", "-0.5"), "--sigma must be > 0"),
    (("--samples", "0"), "--samples must be >= 1"),
    (("--n0", "0"), "--n0 must be >= 1"),
    (("--alpha", "0"), "--alpha must be in"),
    (("--alpha", "1"), "--alpha must be in"),
    (("--norm", "linf"), "certifies l2 only"),
    (("--method", "ibp", "--norm", "l2"), "certifies linf only"),
    (("--method", "ibp", "--sigma", "0.5"), "--sigma applies to --method smoothing"),
    (("--eps", "0.1"), "--eps applies to --method ibp"),
    (("--method", "lp"), "unknown certification method"),
    (("--radii", "0,-1"), "invalid --radii"),
    (("--plot", "curve.txt"), "must name a .png"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(checkpoints, isolated, args, message, monkeypatch):
    monkeypatch.chdir(isolated)
    result = run_cli("certify", "-c", str(checkpoints["noisy"]), "--device", "cpu", "--plot", "out.png", *args)
    assert message in assert_one_line_error(result, 2)
    assert not (isolated / "out.png").exists() and not (isolated / "curve.txt").exists()


def test_smoothing_needs_a_sigma_for_a_model_trained_without_noise(checkpoints, isolated):
    result = run_cli("certify", "-c", str(checkpoints["plain"]), "-n", "1", "--device", "cpu")
    assert "give --sigma" in assert_one_line_error(result, 2)


def test_ibp_refuses_a_model_with_unsupported_layers_exit_1(checkpoints, isolated, monkeypatch):
    import robustcnn.certify as certify

    def refuse(model):
        raise ValueError("interval bounds do not support the layer Mystery")

    monkeypatch.setattr(certify, "check_supported", refuse)
    result = run_cli("certify", "--method", "ibp", "-c", str(checkpoints["plain"]), "--device", "cpu")
    assert "Mystery" in assert_one_line_error(result, 1)


@pytest.mark.parametrize("args, message", [
    (("--noise", "gaussian"), "--noise gaussian needs --sigma > 0"),
    (("--noise", "gaussian", "--sigma", "0"), "--noise gaussian needs --sigma > 0"),
    (("--sigma", "0.25"), "--sigma only applies to --noise gaussian"),
    (("--noise", "uniform", "--sigma", "0.25"), "unknown noise"),
    (("--noise", "gaussian", "--sigma", "0.25", "--adv", "pgd"), "do not combine"),
    (("--adv", "ibp", "--adv-steps", "3"), "--adv-steps does not apply to --adv ibp"),
    (("--adv", "ibp", "--adv-norm", "l2", "--eps", "0.5"), "Linf boxes only"),
])
def test_train_options_for_certification_refuse_bad_input(isolated, args, message):
    result = run_cli("train", "--dataset", "shapes", "--device", "cpu", "--out", str(isolated / "runs"), *args)
    assert message in assert_one_line_error(result, 2)
    assert not (isolated / "runs").exists()
