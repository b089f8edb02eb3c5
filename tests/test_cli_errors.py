"""Failures that end in one clear line and the right exit code instead of a raw torch or OS error: failed writes,
labels outside the model's classes, report states and checkpoints that are not what they claim, unbounded counts,
and file names holding line breaks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustcnn.errors import WriteError
from robustcnn.fsutil import atomic_write
from train_fixtures import assert_one_line_error, isolated, run_cli, tiny_config  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent

#: Runs the rest of argv under a file-size limit (argv[1] bytes), with SIGXFSZ ignored so that a write past the limit
#: fails with EFBIG instead of killing the process.
LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") else runpy.run_module(
    "cli", run_name="__main__", alter_sys=True)
"""


def _limited(tmp_path: Path, limit: int, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
           "ROBUSTCNN_HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("ROBUSTCNN_DEBUG", None)
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# -- failed writes ----------------------------------------------------------------------------------------------
def test_a_write_past_the_file_size_limit_names_the_file_and_keeps_the_old_one(tmp_path):
    """Without the recorded OS error, torch.save's "unexpected pos" RuntimeError is all the caller would see."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"the older file")
    script = tmp_path / "save.py"
    script.write_text(
        "import sys, torch\nfrom robustcnn.fsutil import atomic_write\nfrom robustcnn.errors import WriteError\n"
        "try:\n    atomic_write(sys.argv[1], lambda f: torch.save({'w': torch.zeros(100_000)}, f))\n"
        "except WriteError as exc:\n    print(exc)\n")
    done = _limited(tmp_path, 20_000, str(script), str(target))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"cannot write {target}: file too large (the file-size limit was reached); "
                                   "any earlier version of the file is unchanged")
    assert target.read_bytes() == b"the older file" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.pt", "save.py"], "the older file changed or a temporary file was left"


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_is_a_write_error_naming_the_file(tmp_path, monkeypatch, code, words):
    """A full disk often shows only when the data reach it (flush, fsync); simulated by a failing fsync."""
    target = tmp_path / "report.json"
    target.write_text("old")

    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=rf"^cannot write {target}: {words}; any earlier version"):
        atomic_write(target, lambda handle: handle.write(b"new"))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_error_reading_the_writers_own_source_is_not_called_a_write_error(tmp_path):
    def write(handle):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "source.bin")

    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "copy.bin", write)


def test_a_bug_in_the_writer_is_not_disguised_as_a_write_error(tmp_path):
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x", lambda handle: 1 / 0)


def test_cli_train_past_the_file_size_limit_exits_1_with_one_line(tmp_path):
    done = _limited(tmp_path, 20_000, "robustcnn", "train", "--dataset", "shapes", "--model", "lenet5", "--limit",
                    "128", "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", str(tmp_path / "runs"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot write {tmp_path / 'runs'}") and "file too large" in lines[0]
    assert "internal error" not in lines[0]


# -- labels, report states, checkpoints -------------------------------------------------------------------------
def _four_class_shapes_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint of a shapes model with only 4 of the 6 classes: shapes' test labels 4 and 5 are outside it."""
    from robustcnn.data import ImageData, make_shapes
    from robustcnn.train import train

    def four(data):
        keep = data.labels < 4
        return ImageData(data.images[keep], data.labels[keep], data.classes[:4], data.name)

    path = tmp_path / "four.pt"
    train(tiny_config(dataset="shapes", epochs=1), four(make_shapes(128, seed=1, image_size=32)),
          four(make_shapes(64, seed=2, image_size=32)), checkpoint=path)
    return path


def test_cli_attack_on_labels_outside_the_model_exits_1(isolated):
    path = _four_class_shapes_checkpoint(isolated)
    line = assert_one_line_error(run_cli("attack", "--checkpoint", str(path), "--method", "fgsm", "--n", "64",
                                         "--device", "cpu"), 1)
    assert "label 5 is out of range" in line and "4 outputs" in line  # the data is checked against the model first


def test_a_report_state_of_the_wrong_type_is_refused_in_one_line(newest, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    torch.save([1, 2, 3], out / "state.pt")
    line = assert_one_line_error(run_cli("report", "--attacks", "fgsm", "--n", "8", "--out", str(out)), 2)
    assert "state.pt is a file robustcnn did not write" in line
    assert torch.load(out / "state.pt") == [1, 2, 3]


def test_a_checkpoint_naming_an_unknown_dataset_is_a_runtime_error(newest, tmp_path):
    from robustcnn.checkpoint import latest_checkpoint

    doc = torch.load(latest_checkpoint(), weights_only=True)
    doc["meta"]["dataset"] = "imagenet"
    torch.save(doc, tmp_path / "odd.pt")
    line = assert_one_line_error(run_cli("attack", "--checkpoint", str(tmp_path / "odd.pt"), "--method", "fgsm",
                                         "--n", "8"), 1)
    assert "names dataset 'imagenet'" in line


# -- counts and paths -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (("attack", "--method", "pgd", "--steps", str(2**63)), "steps must be <= 100,000"),
    (("attack", "--method", "square", "--queries", str(2**63)), "max_queries must be <= 10,000,000"),
    (("attack", "--method", "pgd", "--n", str(2**40)), "--n must be <= 10,000,000"),
    (("train", "--dataset", "shapes", "--epochs", str(2**63)), "--epochs must be <= 10,000"),
    (("train", "--dataset", "shapes", "--adv", "pgd", "--eps", "0.1", "--adv-steps", str(2**63)),
     "--adv-steps must be an integer >= 1 and <= 100,000"),
    (("report", "--batch-size", str(2**62)), "--batch-size must be <= 1,000,000"),
])
def test_huge_counts_are_usage_errors(newest, args, message):
    line = assert_one_line_error(run_cli(*args), 2)
    assert message in line


@pytest.mark.parametrize("name", ["two\nlines.pt", "cr\rhere.pt", "[bold]markup[/].pt"])
def test_a_path_with_a_line_break_or_markup_keeps_the_message_on_one_line(isolated, name):
    line = assert_one_line_error(run_cli("attack", "--checkpoint", str(isolated / name), "--method", "fgsm"), 1)
    assert repr(name)[1:-1] in line
