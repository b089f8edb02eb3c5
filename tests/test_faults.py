"""Faults and misuse around written files: real processes killed, a full disk, two writers on one output, and
files of the user's in the way. The cases are those of ``benchmarks/bench_faults.py`` (which runs the fuller set)."""

from __future__ import annotations

import os
import random
import signal

import pytest

from benchmarks.bench_faults import (CHECKPOINT, Workspace, disk_full, kill, reporting, snapshot, training,
                                     two_writers)
from robustcnn.errors import ForeignFileError, OutputBusyError
from robustcnn.fsutil import OutputLock, is_ours, lock_file, refuse_foreign
from train_fixtures import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A workspace and its reference folder, whose training run had a second run refused while it held the
    checkpoint (SIGSTOP) and then finished: (workspace, reference folder)."""
    ws = Workspace(tmp_path_factory.mktemp("faults"))
    ref = ws.folder("reference")
    outcome = two_writers(ws, training(ws), ref)
    assert outcome.clean, outcome
    return ws, ref


def test_a_second_training_into_the_same_checkpoint_is_refused_while_the_first_finishes(reference):
    ws, ref = reference
    assert is_ours(ref / CHECKPOINT) and not lock_file(ref / CHECKPOINT).exists()


def test_training_killed_at_a_random_point_loses_nothing_and_resumes_to_the_same_weights(reference):
    ws, ref = reference
    delay = random.Random(0).uniform(0, 3)
    outcome = kill(ws, training(ws), ref, signal.SIGKILL, delay, "killed", earlier=ref)
    assert outcome.clean, outcome


def test_a_full_disk_keeps_the_finished_checkpoint_and_resume_leaves_it_as_it_is(reference):
    """The write fails in one line and the earlier finished checkpoint is byte-identical; the rerun resumes the
    finished run, which reports it and leaves it untouched."""
    ws, ref = reference
    outcome = disk_full(ws, training(ws), ref, 1 << 16, "full", earlier=ref)
    assert outcome.clean and outcome.returncode == 1, outcome
    assert (ws.root / "train-full" / CHECKPOINT).read_bytes() == (ref / CHECKPOINT).read_bytes()


def test_a_second_report_into_the_same_folder_is_refused_while_the_first_finishes(reference):
    ws, ref = reference
    outcome = two_writers(ws, reporting(ws, ref / CHECKPOINT), ref)
    assert outcome.clean, outcome
    for name in ("report.json", "report.md", "report.html", "accuracy_vs_eps.png", "gallery.png"):
        assert is_ours(ref / "rep" / name), name


# -- files of the user's are never replaced ------------------------------------------------------------------------
@pytest.mark.parametrize("name, text", [("report.md", "# My own notes\n"),
                                        ("report.html", "<!DOCTYPE html><title>My page</title>\n")])
def test_a_users_own_report_file_is_never_replaced(reference, tmp_path, monkeypatch, name, text):
    ws, ref = reference
    monkeypatch.setenv("ROBUSTCNN_HOME", str(tmp_path / "home"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text(text)
    line = assert_one_line_error(run_cli("report", "--checkpoint", str(ref / CHECKPOINT), "--attacks", "fgsm",
                                         "--n", "8", "--device", "cpu", "--out", str(out)), 2)
    assert str(out / name) in line and "did not write" in line
    assert (out / name).read_text() == text and sorted(os.listdir(out)) == [name]


def test_training_never_replaces_a_file_of_the_users_under_the_checkpoints_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTCNN_HOME", str(tmp_path / "home"))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / CHECKPOINT).write_bytes(b"my own model")
    line = assert_one_line_error(run_cli("train", "--dataset", "shapes", "--model", "lenet5", "--limit", "64",
                                         "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "runs")), 2)
    assert str(tmp_path / "runs" / CHECKPOINT) in line
    assert (tmp_path / "runs" / CHECKPOINT).read_bytes() == b"my own model"


def test_patch_training_and_saved_examples_never_replace_the_users_pictures(reference, tmp_path, monkeypatch):
    ws, ref = reference
    monkeypatch.setenv("ROBUSTCNN_HOME", str(tmp_path / "home"))
    picture = tmp_path / "mine.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(picture)
    before = picture.read_bytes()
    for args in (("patch", "train", "--out", str(picture)),
                 ("attack", "--method", "fgsm", "--eps", "0.1", "--n", "8", "--save-examples", str(picture))):
        line = assert_one_line_error(run_cli(*args, "--checkpoint", str(ref / CHECKPOINT), "--device", "cpu"), 2)
        assert str(picture) in line and "did not write" in line
    assert picture.read_bytes() == before


def test_our_own_files_are_recognised_by_their_content_and_nothing_else_is(reference, tmp_path):
    ws, ref = reference
    assert is_ours(ref / CHECKPOINT) and is_ours(ref / "rep" / "report.json") and is_ours(ref / "rep" / "report.md")
    damaged = tmp_path / CHECKPOINT
    damaged.write_bytes((ref / CHECKPOINT).read_bytes()[:1000])
    (tmp_path / "other.json").write_text('{"versions": {"torch": "2"}}')
    (tmp_path / "folder.png").mkdir()
    for name in (CHECKPOINT, "other.json", "folder.png", "missing.md"):
        assert not is_ours(tmp_path / name), name
    refuse_foreign(ref / CHECKPOINT, tmp_path / "missing.md")  # ours, or not there: fine
    with pytest.raises(ForeignFileError, match="folder.png is a folder"):
        refuse_foreign(tmp_path / "folder.png")


# -- the lock ------------------------------------------------------------------------------------------------------
def test_an_output_lock_refuses_a_second_holder_and_is_not_blocked_by_a_stale_lock_file(tmp_path):
    target = tmp_path / "out.pt"
    lock_file(target).write_text("999999999\n")  # left behind by a killed run: nobody holds it
    with OutputLock(target):
        assert lock_file(target).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputBusyError, match=rf"another robustcnn run is writing .*out.pt \(pid {os.getpid()}\)"):
            with OutputLock(target):
                pass
    assert not lock_file(target).exists()
    with OutputLock(target, enabled=False):
        assert not lock_file(target).exists()
    assert snapshot(tmp_path) == {}
