"""`robustcnn attack` and `robustcnn attacks` through Typer's CliRunner, on a quick shapes model."""

from __future__ import annotations

import json

import pytest

import attacks
from train_fixtures import assert_one_line_error, isolated, run_cli  # noqa: F401  (fixtures)

QUICK = ("--dataset", "shapes", "--model", "lenet5", "--limit", "512", "--epochs", "3", "--batch-size", "64",
         "--device", "cpu")


@pytest.fixture(scope="module")
def model_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack-cli")
    env = {"ROBUSTCNN_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        result = run_cli("train", *QUICK, "--out", str(root / "runs"), "--json")
    assert result.exit_code == 0, result.stderr
    return root, env


@pytest.fixture
def newest(model_env, isolated, monkeypatch):
    root, env = model_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return root


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
    assert "acc under attack" in result.stdout and "clean acc" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_sample_and_targeted(newest):
    doc = _json(run_cli("attack", "--method", "pgd", "--eps", "0.5", "--steps", "10", "--n", "32",
                        "--target-class", "1", "--per-sample", "--json"))
    row = doc["results"][0]
    assert doc["targeted"] and len(row["per_sample"]["robust"]) == 32
    assert row["config"]["targeted"]


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
