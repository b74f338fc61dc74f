"""The error of the metrics package and the checks of its inputs, shared by the reports and the plots:
each check returns the input as a numpy array (or a list of names) or raises a `MetricsError` that names
the argument and what is wrong with it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cbmir.errors import CbmirError


class MetricsError(CbmirError):
    """Inputs to a metric, report or plot that cannot be evaluated: wrong shape, length, type or value."""


def class_names(classes: Sequence[str]) -> list[str]:
    """The class names as a list: at least one, each non-empty text, none repeated."""
    names = list(classes)
    if not names:
        raise MetricsError("no classes given: `classes` needs at least one name")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise MetricsError(f"class {index} is {name!r}: class names must be non-empty text")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MetricsError(f"class names must be unique, but {', '.join(map(repr, duplicates))} repeat")
    return names


def class_labels(values: npt.ArrayLike, what: str, n_classes: int) -> np.ndarray:
    """One integer class index per image, each in 0..n_classes-1."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise MetricsError(f"{what} must be one-dimensional (one label per image), got shape {array.shape}")
    if array.size == 0:
        raise MetricsError(f"{what} is empty: there is nothing to evaluate")
    if array.dtype.kind not in "iu":
        raise MetricsError(f"{what} must hold integer class indices, got dtype {array.dtype}")
    outside = (array < 0) | (array >= n_classes)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise MetricsError(
            f"{what}[{index}] is {array[index]}, outside the class indices 0..{n_classes - 1} "
            f"({int(outside.sum())} label(s) out of range)"
        )
    return array


def real_matrix(values: npt.ArrayLike, what: str, shape: tuple[int, int]) -> np.ndarray:
    """A float64 matrix of the given shape whose values are all finite."""
    array = np.asarray(values)
    if array.shape != shape:
        raise MetricsError(f"{what} must have shape {shape}, got {array.shape}")
    if array.dtype.kind not in "iuf":
        raise MetricsError(f"{what} must hold numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        row, column = np.argwhere(~np.isfinite(array))[0]
        raise MetricsError(f"{what}[{row}, {column}] is {array[row, column]}: every value must be finite")
    return array
