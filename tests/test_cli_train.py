"""`robustcnn train` / `robustcnn eval` through Typer's CliRunner: results, JSON, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import robustcnn.train as train_module
from robustcnn.checkpoint import read_checkpoint
from train_fixtures import assert_one_line_error, isolated, offline, run_cli, train_run_via_cli  # noqa: F401

QUICK = ("--dataset", "shapes", "--model", "lenet5", "--limit", "256", "--epochs", "2", "--batch-size", "64",
         "--device", "cpu")


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One quick CLI run shared by this module: (its JSON document, checkpoint path, run record path, env)."""
    root = tmp_path_factory.mktemp("cli")
    result, env = train_run_via_cli(root, *QUICK)
    doc = json.loads(result.stdout)  # exactly one JSON document on stdout
    return doc, root / "runs" / "shapes-lenet5.pt", root / "home" / "latest.json", env


@pytest.fixture
def trained(trained_once, isolated, monkeypatch):
    """The shared run, with this test's environment pointing at it."""
    *paths, env = trained_once
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return tuple(paths)


def test_train_json_is_one_document_and_the_run_is_recorded(trained):
    doc, checkpoint, record = trained
    assert doc["checkpoint"] == str(checkpoint) and checkpoint.is_file()
    assert doc["model"] == "lenet5" and doc["dataset"] == "shapes" and doc["epochs"] == 2
    assert 0 <= doc["metrics"]["test_accuracy"] <= 1 and doc["timing"]["images_per_second"] > 0
    assert doc["config"]["limit"] == 256 and len(doc["history"]) == 2
    assert json.loads(record.read_text())["checkpoint"] == str(checkpoint.resolve())


def test_eval_uses_the_newest_run_and_reproduces_its_accuracy(trained):
    doc, checkpoint, _ = trained
    result = run_cli("eval", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    ev = json.loads(result.stdout)
    assert ev["checkpoint"] == str(checkpoint.resolve()) and ev["count"] == 2000
    assert ev["accuracy"] == pytest.approx(doc["metrics"]["test_accuracy"], abs=1e-6)
    assert set(ev["per_class_accuracy"]) == {"circle", "square", "triangle", "cross", "ring", "diamond"}


def test_architecture_settings_and_a_moving_average_reach_the_checkpoint(isolated):
    result, _ = train_run_via_cli(isolated, *QUICK, "--model", "simple", "--arch", "width=4,hidden=16", "--ema",
                                  "0.9", "--label-smoothing", "0.1")
    doc = json.loads(result.stdout)
    assert doc["config"]["arch_args"] == {"width": 4, "hidden": 16}
    assert doc["config"]["ema"] == 0.9 and doc["config"]["label_smoothing"] == 0.1
    evaluated = run_cli("eval", "-c", doc["checkpoint"], "--json")  # rebuilt from the stored settings
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(doc["metrics"]["test_accuracy"])


def test_adversarial_training_defaults_to_its_recipe_and_the_old_defaults_stay_reachable(isolated):
    """`--adv pgd` alone trains the measured recipe (model and its settings, optimizer, average of the weights,
    epochs); naming the model drops the recipe's architecture settings only; --ema 0 turns the average off."""
    from robustcnn.advtrain import RECIPES

    quick = ("--dataset", "shapes", "--limit", "64", "--batch-size", "32", "--device", "cpu", "--adv", "pgd",
             "--adv-val", "16", "--adv-steps", "1")
    recipe = RECIPES["pgd"]
    result, _ = train_run_via_cli(isolated, *quick, "--epochs", "1", "--arch", "hidden=8")
    config = json.loads(result.stdout)["config"]
    assert (config["model"], config["optimizer"], config["ema"]) == (recipe.model, recipe.optimizer, recipe.ema)
    assert config["arch_args"] == {**recipe.arch, "hidden": 8}  # --arch on top of the recipe's settings
    assert recipe.ema is not None and recipe.model != "vgg"  # the test needs a recipe that differs from the old one

    old, _ = train_run_via_cli(isolated, *quick, "--model", "lenet5", "--optimizer", "sgd", "--ema", "0",
                               "--epochs", "1")
    config = json.loads(old.stdout)["config"]
    assert (config["model"], config["optimizer"], config["ema"]) == ("lenet5", "sgd", None)
    assert config["arch_args"] == {}


def test_human_output_is_a_table_on_stdout(trained):
    _, checkpoint, _ = trained
    result = run_cli("eval", "--checkpoint", str(checkpoint), "--batch-size", "500")
    assert result.exit_code == 0 and "test set" in result.stdout and "diamond" in result.stdout
    assert "%" in result.stdout and result.stderr == ""


def test_help_states_every_option():
    text = run_cli("train", "--help").stdout
    for option in ("--model", "--dataset", "--epochs", "--batch-size", "--lr", "--optimizer", "--seed", "--device",
                   "--out", "--augment", "--resume", "--data-dir", "--json"):
        assert option in text, option
    assert "--checkpoint" in run_cli("eval", "--help").stdout


BAD_TRAIN = {
    "unknown dataset": (["--dataset", "fashion"], 2, "did you mean 'fashion-mnist'"),
    "unknown model": (["--model", "vgg16"], 2, "did you mean 'vgg'"),
    "unknown optimizer": (["--optimizer", "rmsprop"], 2, "choose from sgd, adam"),
    "zero epochs": (["--epochs", "0"], 2, "--epochs must be > 0"),
    "negative batch": (["--batch-size", "-8"], 2, "--batch-size must be > 0"),
    "zero lr": (["--lr", "0"], 2, "--lr must be > 0"),
    "cuda without gpu": (["--device", "cuda"], 2, "no CUDA GPU"),
    "not a number": (["--epochs", "many"], 2, "--epochs"),
    "ema decay of one": (["--ema", "1"], 2, "--ema must be a decay in (0, 1)"),
    "arch without value": (["--arch", "width"], 2, "--arch takes KEY=VALUE pairs"),
    "arch not a number": (["--arch", "width=wide"], 2, "--arch width must be a number"),
    "arch key the model lacks": (["--arch", "width=8"], 2, "model lenet5 has no argument(s) width"),
    "arch key twice": (["--arch", "width=8,width=16"], 2, "--arch width is given twice"),
    "label smoothing of one": (["--label-smoothing", "1"], 2, "label smoothing must be in [0, 1)"),
}


@pytest.mark.parametrize("args,code,message", BAD_TRAIN.values(), ids=BAD_TRAIN.keys())
def test_bad_train_options_fail_cleanly_and_touch_nothing(trained, monkeypatch, args, code, message):
    if "cuda" in args:
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _, checkpoint, record = trained
    before = checkpoint.read_bytes(), record.read_bytes()
    out = checkpoint.parent
    line = assert_one_line_error(run_cli("train", "--dataset", "shapes", "--model", "lenet5", "--out", str(out),
                                         *args), code)
    assert message in line
    assert (checkpoint.read_bytes(), record.read_bytes()) == before


def test_data_dir_without_files_and_no_network(isolated, offline):
    result = run_cli("train", "--dataset", "mnist", "--data-dir", str(isolated / "empty"), "--out",
                     str(isolated / "runs"))
    line = assert_one_line_error(result, 1)
    assert "mnist not found" in line and "--data-dir" in line
    assert not (isolated / "runs").exists() and not (isolated / "home").exists()


def _damage(path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "not a checkpoint":
        path.write_text("hello")


@pytest.mark.parametrize("how", ["missing", "truncated", "not a checkpoint"])
def test_eval_refuses_bad_checkpoint_files(trained, how):
    _, checkpoint, record = trained
    bad = checkpoint.parent / "bad.pt"
    if how != "missing":
        shutil.copy(checkpoint, bad)
        _damage(bad, how)
    before = record.read_bytes()
    line = assert_one_line_error(run_cli("eval", "--checkpoint", str(bad)), 1)
    assert str(bad) in line
    assert record.read_bytes() == before


def test_eval_without_any_run_says_to_train_first(isolated):
    line = assert_one_line_error(run_cli("eval"), 1)
    assert "no trained model yet: run `robustcnn train` first" in line


def test_resume_refuses_a_checkpoint_of_another_architecture(trained):
    _, checkpoint, record = trained
    impostor = checkpoint.parent / "shapes-simple.pt"
    shutil.copy(checkpoint, impostor)
    before = impostor.read_bytes(), record.read_bytes()
    args = ("--dataset", "shapes", "--model", "simple", "--out", str(checkpoint.parent), "--resume")
    line = assert_one_line_error(run_cli("train", *args), 1)
    assert "architecture 'lenet5', not 'simple'" in line
    assert (impostor.read_bytes(), record.read_bytes()) == before


def test_resuming_a_finished_run_reports_it_and_leaves_its_checkpoint_as_it_is(trained, monkeypatch):
    doc, checkpoint, _ = trained
    before = checkpoint.read_bytes()
    monkeypatch.setattr(train_module, "_run_epoch", lambda *args: pytest.fail("a finished run was trained again"))
    result = run_cli("train", *QUICK, "--out", str(checkpoint.parent), "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert checkpoint.read_bytes() == before
    again = json.loads(result.stdout)
    assert again["epochs"] == 2 and again["metrics"] == doc["metrics"] and again["history"] == doc["history"]
    assert f"{checkpoint} holds a finished run: nothing to resume" in result.stderr


def test_interrupted_training_keeps_its_last_epoch_and_resume_finishes_it(isolated, monkeypatch):
    quick = (*QUICK[:7], "3", *QUICK[8:])  # three epochs
    whole = run_cli("train", *quick, "--out", str(isolated / "whole"), "--json")
    assert whole.exit_code == 0, whole.stderr

    real_epoch = train_module._run_epoch

    def ctrl_c_in_epoch_two(run, data, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(run, data, epoch, *args)

    monkeypatch.setattr(train_module, "_run_epoch", ctrl_c_in_epoch_two)
    record = isolated / "home" / "latest.json"
    before = record.read_bytes()
    line = assert_one_line_error(run_cli("train", *quick, "--out", str(isolated / "part")), 130)
    assert "holds epoch 1" in line and "--resume" in line
    assert record.read_bytes() == before  # an unfinished run is not recorded as the newest

    monkeypatch.setattr(train_module, "_run_epoch", real_epoch)
    resumed = run_cli("train", *quick, "--out", str(isolated / "part"), "--resume", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["metrics"] == json.loads(whole.stdout)["metrics"]


def test_sigterm_stops_training_cleanly_and_keeps_the_last_checkpoint(isolated):
    """A real process, a real SIGTERM: exit 130, one line, and a loadable checkpoint of the last full epoch."""
    checkpoint = isolated / "runs" / "shapes-lenet5.pt"
    args = [*QUICK[:7], "200", *QUICK[8:], "--out", str(isolated / "runs")]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "train", *args], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().startswith("error: interrupted") and len(err.strip().splitlines()) == 1 and out == ""
    epochs = read_checkpoint(checkpoint)["resume"]["epoch"]
    assert 1 <= epochs < 200
