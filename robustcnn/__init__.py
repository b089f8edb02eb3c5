"""robustcnn: train convolutional networks and measure how much of their accuracy survives an attacker."""

from robustcnn.errors import CheckpointError, DataNotFoundError, RobustCNNError, UsageError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "DataNotFoundError", "RobustCNNError", "UsageError", "__version__", "load_data",
           "load_model"]


def __getattr__(name: str):
    """``load_model`` and ``load_data``, imported on first use (they import torch; ``import robustcnn`` does not)."""
    if name == "load_model":
        from robustcnn.loading import load_model

        return load_model
    if name == "load_data":
        from robustcnn.userdata import load_data

        return load_data
    raise AttributeError(f"module 'robustcnn' has no attribute {name!r}")
