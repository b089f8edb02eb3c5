"""`robustcnn attack` and `robustcnn attacks` through Typer's CliRunner, on a quick shapes model."""

from __future__ import annotations

import json

import pytest

import attacks
from train_fixtures import assert_one_line_error, isolated, run_cli  # noqa: F401  (fixtures)

def _json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_attack_newest_model_with_fgsm_json(newest):
    doc = _json(run_cli("attack", "--method", "fgsm", "--eps", "0.005", "--n", "64", "--json"))
    (row,) = doc["results"]
    assert doc["method"] == "fgsm" and row["eps"] == 0.005 and row["n"] == 64
    assert row["robust_accuracy"] <= row["clean_accuracy"]
    st = row["attacks"]["fgsm"]
    assert st["max_norm"] <= 0.005 + 1e-6 and st["queries_mean"] > 0


def test_eps_list_and_fractions(newest):
    doc = _json(run_cli("attack", "--method", "pgd", "--eps", "8/255,0.3", "--steps", "5", "--n", "64", "--json"))
    accs = [r["robust_accuracy"] for r in doc["results"]]
    assert [r["eps"] for r in doc["results"]] == [8 / 255, 0.3]
    assert accs[1] <= accs[0] and accs[1] < doc["results"][0]["clean_accuracy"]


def test_human_table_and_example_grid(newest, tmp_path):
    png = tmp_path / "ex.png"
    result = run_cli("attack", "--method", "pgd", "--eps", "0.3", "--steps", "5", "--n", "32",
                     "--save-examples", str(png))
    assert result.exit_code == 0, result.stderr
    assert all(col in result.stdout for col in ("clean", "robust", "success", "max", "fwd/img", "bwd/img", "time"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_l2_budget_above_one(newest):
    doc = _json(run_cli("attack", "--method", "pgd", "--norm", "l2", "--eps", "1.5", "--steps", "2", "--n", "8",
                        "--json"))
    (row,) = doc["results"]
    assert row["eps"] == 1.5 and 0 < row["attacks"]["pgd"]["max_norm"] <= 1.5 + 1e-5
    # an L2 attack's own default norm measures --eps when --norm is not given
    doc = _json(run_cli("attack", "--method", "deepfool", "--eps", "1.5", "--steps", "2", "--n", "8", "--json"))
    assert doc["results"][0]["eps"] == 1.5


def test_per_sample_and_targeted(newest):
    doc = _json(run_cli("attack", "--method", "pgd", "--eps", "0.5", "--steps", "10", "--n", "32",
                        "--target-class", "1", "--per-sample", "--json"))
    row = doc["results"][0]
    assert doc["targeted"] and len(row["per_sample"]["robust"]) == 32
    assert row["config"]["targeted"]


def test_black_box_table_json_and_simba_basis(newest):
    doc = _json(run_cli("attack", "--method", "simba", "--basis", "pixel", "--eps", "0.3", "--queries", "50",
                        "--n", "16", "--per-sample", "--json"))
    row = doc["results"][0]
    st = row["attacks"]["simba"]
    assert st["config"]["basis"] == "pixel" and st["config"]["max_queries"] == 50
    assert "queries_mean_success" in st and "queries_median_success" in st
    assert len(row["per_sample"]["queries"]) == 16 and max(row["per_sample"]["queries"]) <= 50
    result = run_cli("attack", "--method", "simba", "--basis", "dct", "--eps", "0.3", "--queries", "50", "--n", "16")
    assert result.exit_code == 0, result.stderr
    assert all(col in result.stdout for col in ("budget", "q mean", "q median", "queries per successful")), \
        result.stdout
    assert "bwd/img" not in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("--method", "pgd", "--basis", "dct"), "--basis does not apply to pgd"),
        (("--method", "square", "--basis", "pixel"), "--basis does not apply to square"),
        (("--method", "simba", "--basis", "wavelet"), "basis must be one of pixel, dct"),
    ],
)
def test_basis_is_only_for_simba_and_validated(newest, args, message):
    line = assert_one_line_error(run_cli("attack", "--n", "8", *args), 2)
    assert message in line


def test_help_lists_every_registered_attack():
    result = run_cli("attack", "--help")
    assert result.exit_code == 0
    for name in attacks.available():
        assert name in result.stdout


def test_attacks_lists_the_registry():
    doc = _json(run_cli("attacks", "--json"))
    assert [d["name"] for d in doc] == attacks.available()
    assert all(d["kind"] in attacks.KINDS and d["description"] for d in doc)
    assert "white-box" in run_cli("attacks").stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("--eps", "-0.1"), 2, "must be >= 0"),
        (("--eps", "1.5"), 2, "eps must be <= 1"),
        (("--norm", "linf", "--method", "deepfool", "--eps", "1.5"), 2, "eps must be <= 1"),
        (("--norm", "l2", "--eps", "-1"), 2, "must be >= 0"),
        (("--eps", "0.1,,x"), 2, "invalid eps"),
        (("--method", "pgd", "--steps", "0"), 2, "steps must be >= 1"),
        (("--method", "pgdd"), 2, "did you mean pgd"),
        (("--method", "fgsm", "--steps", "3"), 2, "--steps does not apply to fgsm"),
        (("--method", "cw", "--norm", "linf"), 2, "does not support --norm linf"),
        (("--method", "deepfool", "--targeted"), 2, "no targeted mode"),
        (("--method", "pgd", "--target-class", "99"), 2, "--target-class must be in"),
        (("--save-examples", "out.txt"), 2, ".png"),
        (("--checkpoint", "/nonexistent/model.pt"), 1, "model.pt"),
    ],
)
def test_bad_input_is_one_line_and_exit_code(newest, args, code, message):
    line = assert_one_line_error(run_cli("attack", "--n", "8", *args), code)
    assert message in line


def test_attack_without_any_model_says_to_train_first(isolated):
    line = assert_one_line_error(run_cli("attack"), 1)
    assert "robustcnn train" in line


def test_attack_with_a_saved_patch_and_bad_patch_files(newest, tmp_path):
    stem = tmp_path / "p"
    made = run_cli("patch", "train", "--area", "0.1", "--steps", "5", "--train-images", "64", "--n", "16",
                   "--out", str(stem), "--json")
    assert made.exit_code == 0, made.stderr
    doc = _json(run_cli("attack", "--method", "patch", "--patch", str(stem) + ".pt", "--n", "32", "--json"))
    st = doc["results"][0]["attacks"]["patch"]
    assert 0 < st["max_norm"] <= 0.1 + 1e-9  # the norm of a patch attack is its area fraction
    trained, control = doc["results"]  # the second row is the control: same-size noise, a fresh draw per image
    assert "control" not in trained and control["control"] == "noise"
    noise = control["attacks"]["patch"]
    assert noise["config"]["noise"] is True and noise["max_norm"] == st["max_norm"]
    assert control["clean_accuracy"] == trained["clean_accuracy"]
    table = run_cli("attack", "--method", "patch", "--patch", str(stem) + ".pt", "--n", "32")
    assert table.exit_code == 0 and "trained" in table.stdout and "noise" in table.stdout
    (tmp_path / "bad.pt").write_text("not a tensor")
    assert "not a tensor file" in assert_one_line_error(
        run_cli("attack", "--method", "patch", "--patch", str(tmp_path / "bad.pt")), 2)
    assert "cannot read" in assert_one_line_error(
        run_cli("attack", "--method", "patch", "--patch", str(tmp_path / "missing.pt")), 1)
    assert "--method patch only" in assert_one_line_error(
        run_cli("attack", "--method", "fgsm", "--patch", str(stem) + ".pt"), 2)


def test_param_sets_any_field_read_by_its_type(newest):
    """Fields without a named option are set with --param NAME=VALUE (fractions for pixel units, booleans)."""
    doc = _json(run_cli("attack", "--method", "mifgsm", "--eps", "0.1", "--steps", "3", "--param", "decay=0.5",
                        "--param", "alpha=1/255", "--param", "early_stop=false", "--n", "16", "--json"))
    cfg = doc["results"][0]["attacks"]["mifgsm"]["config"]
    assert cfg["decay"] == 0.5 and cfg["alpha"] == 1 / 255 and cfg["early_stop"] is False and cfg["steps"] == 3
    doc = _json(run_cli("attack", "--method", "apgd-t", "--eps", "0.1", "--steps", "2", "--param",
                        "n_target_classes=1", "--n", "8", "--json"))
    assert doc["results"][0]["attacks"]["apgd-t"]["config"]["n_target_classes"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (("--method", "pgd", "--param", "decay=0.5"), "--param decay: pgd has no parameter 'decay'; it takes eps, "
                                                      "norm, steps"),
        (("--method", "pgd", "--param", "steps=2.5"), "--param steps: steps takes a whole number, got '2.5'"),
        (("--method", "pgd", "--param", "random_start=maybe"), "random_start takes true or false"),
        (("--method", "pgd", "--param", "steps"), "--param takes NAME=VALUE, got 'steps'"),
        (("--method", "pgd", "--param", "steps=2", "--param", "steps=3"), "--param steps is given twice"),
        (("--method", "pgd", "--steps", "2", "--param", "steps=3"), "steps is set twice: by --steps and by --param"),
        (("--method", "pgd", "--param", "eps=0.1"), "set eps with --eps"),
        (("--method", "patch", "--param", "patch=p.pt"), "set patch with --patch FILE"),
        (("--method", "mifgsm", "--param", "decay=-1"), "mifgsm: decay must be >= 0"),
        (("--method", "deepfool", "--param", "overshoot=-0.5"), "overshoot must be >= 0"),
        (("--method", "onepixel", "--param", "population=2"), "population must be >= 4"),
        (("--method", "lavan", "--param", "location=corner"), "location must be one of saliency, center, random"),
    ],
)
def test_bad_param_is_a_one_line_usage_error(newest, args, message):
    line = assert_one_line_error(run_cli("attack", "--n", "8", *args), 2)
    assert message in line


def test_attacks_describes_every_parameter():
    doc = _json(run_cli("attacks", "--json"))
    for entry in doc:
        spec = attacks.get(entry["name"])
        assert list(entry["params"]) == list(spec.params)
        for name, info in entry["params"].items():
            assert info["default"] == spec.params[name] or name == "patch"
            assert info["help"] and info["type"] and info["option"]
    one = _json(run_cli("attacks", "eotpgd", "--json"))
    assert one["params"]["eot_samples"] == {"type": "int", "default": 10, "help": attacks.get("eotpgd").parameter(
        "eot_samples").help, "runtime": False, "option": "--param eot_samples="}
    assert one["params"]["steps"]["option"] == "--steps" and one["params"]["eps"]["option"] == "--eps"
    assert _json(run_cli("attacks", "square", "--json"))["params"]["work_set"]["runtime"] is True
    table = run_cli("attacks", "cw").stdout
    assert all(word in table for word in ("kappa", "binary_steps", "abort_early", "--c", "--param kappa="))
    assert "decay" in run_cli("attacks").stdout  # the list names each attack's parameters
    assert "did you mean pgd" in assert_one_line_error(run_cli("attacks", "pgdd"), 2)
    assert "not both" in assert_one_line_error(run_cli("attacks", "pgd", "--kind", "score"), 2)
