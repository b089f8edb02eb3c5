"""Checkpoints: round trip, refusal of missing/truncated/foreign/mismatched files, atomic writes, newest run."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from robustcnn.checkpoint import (latest_checkpoint, load_model, read_checkpoint, record_latest, robustcnn_home,
                                  save_checkpoint)
from robustcnn.errors import CheckpointError
from robustcnn.fsutil import atomic_write
from train_fixtures import isolated, shapes, tiny_train  # noqa: F401  (fixtures)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.pt"
    return path, tiny_train(checkpoint=path, epochs=1)


def test_round_trip_rebuilds_the_same_model_with_its_metadata(saved):
    path, result = saved
    model, meta = load_model(path)
    assert not model.training
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), atol=1e-6)  # memory layouts differ: not bitwise
    assert meta["dataset"] == "shapes" and meta["architecture"] == "lenet5" and meta["input_shape"] == [3, 16, 16]
    assert meta["classes"] == list(shapes(1, 0).classes) and len(meta["normalization"]["mean"]) == 3
    assert meta["config"]["seed"] == 0 and meta["metrics"]["test_accuracy"] == result.metrics["test_accuracy"]
    assert {"torch", "torchvision", "robustcnn", "python"} <= set(meta["versions"]) and meta["complete"]


def _damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("this is not a checkpoint\n")
    elif how == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif how == "bare-tensor":
        torch.save(torch.zeros(3), path)


@pytest.mark.parametrize("how", ["truncated", "empty", "text", "foreign", "bare-tensor"])
def test_damaged_or_foreign_files_raise_one_line_checkpoint_errors(saved, how):
    path, _ = saved
    _damage(path, how)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        read_checkpoint(tmp_path)


def test_a_checkpoint_of_another_architecture_is_refused(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match="architecture 'lenet5', not 'vgg'"):
        load_model(path, architecture="vgg")
    load_model(path, architecture="lenet5", dataset="shapes")  # the matching request is accepted


def test_metadata_that_does_not_fit_the_weights_is_refused(saved):
    path, result = saved
    doc = read_checkpoint(path)
    doc["meta"]["architecture"] = "simple"
    torch.save(doc, path)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def crash(handle):
        handle.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_newest_run_record(isolated, saved):
    path, result = saved
    with pytest.raises(CheckpointError, match="no trained model yet: run `robustcnn train` first"):
        latest_checkpoint()
    record_latest(path, result.meta)
    assert robustcnn_home() == isolated / "home"
    assert latest_checkpoint() == path.resolve()
    record = json.loads((isolated / "home" / "latest.json").read_text())
    assert record["architecture"] == "lenet5" and record["dataset"] == "shapes"
    path.unlink()
    with pytest.raises(CheckpointError, match="is gone"):
        latest_checkpoint()
    (isolated / "home" / "latest.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="damaged"):
        latest_checkpoint()


def test_checkpoint_is_a_plain_weights_only_document(saved, tmp_path):
    path, result = saved
    doc = torch.load(path, weights_only=True, map_location="cpu")
    assert doc["format"] == "robustcnn-checkpoint" and set(doc) == {"format", "version", "model", "meta", "resume"}
    copy = save_checkpoint(tmp_path / "copy.pt", result.model, doc["meta"])
    assert read_checkpoint(copy)["resume"] is None


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    """Not the owner-only mode of the temporary file it writes first: saved files can be shared like any other."""
    old = os.umask(0o027)
    try:
        written = atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        with open(tmp_path / "b.bin", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o640
