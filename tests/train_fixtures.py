"""Fixtures and helpers for the training-core tests (imported by those test modules).

Every test here runs with ``ROBUSTCNN_HOME``, the user cache and ``ROBUSTCNN_DATA`` pointed at temporary folders,
so nothing touches the real home directory.
"""

from __future__ import annotations

import gzip
import socket
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from robustcnn.data import ImageData, make_shapes
from robustcnn.train import TrainConfig, train


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """Point every robustcnn location at ``tmp_path`` subfolders; return ``tmp_path``."""
    monkeypatch.setenv("ROBUSTCNN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBUSTCNN_DATA", raising=False)
    monkeypatch.delenv("ROBUSTCNN_DEBUG", raising=False)
    return tmp_path


@pytest.fixture
def offline(monkeypatch) -> None:
    """Make every network connection fail at once, as on a machine without network."""
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def shapes(count: int, seed: int) -> ImageData:
    return make_shapes(count, seed=seed, image_size=16)


def tiny_config(**overrides) -> TrainConfig:
    """A run that takes well under a second: LeNet-5 on 192 small shapes."""
    values = dict(model="lenet5", dataset="shapes", epochs=2, batch_size=32, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def tiny_train(checkpoint=None, **overrides):
    return train(tiny_config(**overrides), shapes(192, 1), shapes(64, 2), checkpoint=checkpoint)


def train_run_via_cli(root: Path, *args: str):
    """``robustcnn train ARGS --out ROOT/runs --json`` with ``ROBUSTCNN_HOME``/cache under ``root``.

    Returns (CLI result, the environment variables that point at that run)."""
    env = {"ROBUSTCNN_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        result = run_cli("train", *args, "--out", str(root / "runs"), "--json")
    assert result.exit_code == 0, result.stderr
    return result, env


def run_cli(*args: str):
    """Invoke ``robustcnn ARGS`` in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, code: int) -> str:
    """The failure contract: exit ``code``, one ``error:`` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


def write_idx(folder: Path, images: torch.Tensor, labels: torch.Tensor, *, train: bool, gz: bool) -> None:
    """Write images (N, H, W) uint8 and labels in the idx format of (Fashion-)MNIST."""
    prefix = "train" if train else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    blobs = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x0803, n, h, w) + images.numpy().tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x0801, n) + labels.to(torch.uint8).numpy().tobytes(),
    }
    for name, blob in blobs.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
