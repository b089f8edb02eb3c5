"""Checkpoints (one file per model) and the record of the newest run.

A checkpoint is a plain dict saved with ``torch.save`` and read back with ``weights_only=True``::

    {"format": "robustcnn-checkpoint", "version": 1,
     "model": state_dict,
     "meta": {"architecture", "arch_args", "dataset", "input_shape", "classes", "normalization",
              "config", "metrics", "seed", "versions", "epochs_done", "complete", "history", "timing", ...},
     "resume": {"optimizer", "scheduler", "epoch"} or None}

It is written atomically, so an interrupted run always leaves the last complete checkpoint. The newest finished run
is recorded in ``$ROBUSTCNN_HOME/latest.json`` (default ``~/.robustcnn``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustcnn.data import DATASETS
from robustcnn.errors import CheckpointError
from robustcnn.fsutil import atomic_write
from robustcnn.models import build_model

FORMAT = "robustcnn-checkpoint"
VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the packages that produced a checkpoint."""
    import robustcnn

    try:  # the installed distribution's version; importing torchvision just for this takes seconds
        vision = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        vision = "none"
    return {"robustcnn": str(robustcnn.__version__), "torch": str(torch.__version__), "torchvision": vision,
            "python": platform.python_version()}


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any],
                    resume: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights, ``meta`` and optional resume state to ``path`` atomically."""
    doc = {"format": FORMAT, "version": VERSION, "model": model.state_dict(), "meta": meta, "resume": resume}
    return atomic_write(path, lambda handle: torch.save(doc, handle))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint file; :class:`CheckpointError` (one line) if it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        doc = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch.load fails in many ways on foreign or damaged bytes; all mean "unreadable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt? {reason[:160]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a robustcnn checkpoint")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {doc.get('version')}; this robustcnn reads {VERSION}")
    if not isinstance(doc.get("model"), dict) or not isinstance(doc.get("meta"), dict):
        raise CheckpointError(f"{path} is a damaged robustcnn checkpoint (no weights or no metadata)")
    return doc


def check_meta(path: str | Path, meta: dict[str, Any], **expected: Any) -> None:
    """Refuse a checkpoint whose metadata differs from ``expected`` (e.g. ``architecture="vgg"``); None = any."""
    wrong = [f"{key} {meta.get(key)!r}, not {want!r}" for key, want in expected.items()
             if want is not None and meta.get(key) != want]
    if wrong:
        raise CheckpointError(f"{path} holds a model with {'; '.join(wrong)}: refusing to use it")


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """Rebuild the (untrained) architecture a checkpoint's metadata describes."""
    channels, height, _ = meta["input_shape"]
    norm = meta["normalization"]
    return build_model(meta["architecture"], in_channels=channels, image_size=height, num_classes=len(meta["classes"]),
                       mean=norm["mean"], std=norm["std"], **meta.get("arch_args", {}))


def load_model(path: str | Path, device: str | torch.device = "cpu", **expected: Any) -> tuple[nn.Module, dict]:
    """Load the model in ``path`` onto ``device`` in eval mode; return it with the checkpoint's metadata.

    ``expected`` metadata (``architecture="vgg"``, ``dataset="mnist"``) is checked first; a mismatch, a missing,
    truncated or foreign file, or weights that do not fit the recorded architecture raise :class:`CheckpointError`.
    """
    doc = read_checkpoint(path)
    meta = doc["meta"]
    check_meta(path, meta, **expected)
    if meta.get("dataset") not in DATASETS:
        raise CheckpointError(f"{path} names dataset {meta.get('dataset')!r}, which this robustcnn does not know "
                              f"(it knows {', '.join(DATASETS)}): not a checkpoint it can evaluate")
    try:
        model = model_from_meta(meta)
        model.load_state_dict(doc["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: weights do not fit its {meta.get('architecture')} metadata ({first[:160]})") from None
    # channels_last, the layout training uses: on the CPU it runs these CNNs 1.3-1.6x faster than the default layout
    # (max-pooling about 7x), with the same results up to float rounding; inputs may keep any layout.
    return model.to(device, memory_format=torch.channels_last).eval(), meta


def robustcnn_home() -> Path:
    """Where robustcnn keeps its own records: ``$ROBUSTCNN_HOME`` or ``~/.robustcnn``."""
    return Path(os.environ.get("ROBUSTCNN_HOME") or Path.home() / ".robustcnn")


def record_latest(checkpoint: str | Path, meta: dict[str, Any]) -> Path:
    """Record ``checkpoint`` as the newest run (atomically), for commands run without ``--checkpoint``."""
    doc = {"checkpoint": str(Path(checkpoint).resolve()), "dataset": meta.get("dataset"),
           "architecture": meta.get("architecture"), "metrics": {"test_accuracy": meta.get("metrics", {}).get("test_accuracy")}}
    text = json.dumps(doc, indent=2).encode()
    return atomic_write(robustcnn_home() / "latest.json", lambda handle: handle.write(text))


def latest_checkpoint() -> Path:
    """The checkpoint of the newest finished ``robustcnn train`` run, or :class:`CheckpointError`."""
    record = robustcnn_home() / "latest.json"
    if not record.is_file():
        raise CheckpointError("no trained model yet: run `robustcnn train` first (or pass --checkpoint PATH)")
    try:
        path = Path(json.loads(record.read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{record} is damaged: run `robustcnn train` again (or pass --checkpoint PATH)") from None
    if not path.is_file():
        raise CheckpointError(f"the newest run's checkpoint {path} is gone: run `robustcnn train` or pass --checkpoint PATH")
    return path
