"""Device selection shared by every command: ``auto`` picks CUDA when a GPU is present, else the CPU."""

from __future__ import annotations

import torch

from robustcnn.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:N]`` into a ``torch.device``; refuse CUDA when no GPU is visible."""
    if isinstance(name, torch.device):
        return name
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was requested but no CUDA GPU is available (use --device cpu or auto)")
        return torch.device(name)
    raise UsageError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")


def default_batch_size(device: torch.device, *, training: bool) -> int:
    """Batch size measured to be fast for small CNNs: 128/250 on a CPU (cache-friendly), 512/1024 on a GPU."""
    if device.type == "cuda":
        return 512 if training else 1024
    return 128 if training else 250
