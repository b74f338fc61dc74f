"""Reading radiographs into numpy arrays and preprocessing them for a model."""
