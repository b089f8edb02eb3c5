"""`robustcnn train` and `robustcnn eval` (placeholder until the training core lands)."""
