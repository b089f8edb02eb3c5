"""robustcnn: train convolutional networks and measure how much of their accuracy survives an attacker."""

from robustcnn.errors import CheckpointError, DataNotFoundError, RobustCNNError, UsageError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "DataNotFoundError", "RobustCNNError", "UsageError", "__version__"]
