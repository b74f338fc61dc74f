"""cbmir: content-based medical image retrieval for radiographs."""

__version__ = "0.1.0"
