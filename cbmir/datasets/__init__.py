"""Dataset readers: each archive layout becomes a `Dataset` of `Record`s, one per labelled image.

Layouts (one module each, registered in `cbmir.datasets.registry`): ImageCLEF/IRMA (image folder +
``image_id;irma_code`` CSV), MedMNIST ``.npz`` archives, NIH ChestX-ray14 (label table joined to an image
tree), DICOM trees (optionally labelled by a CSV) and class-per-folder trees (optionally below
train/validation/test folders). `open_dataset` picks the reader from what a path holds.

A reader never drops anything silently: a row or file with a problem (missing image, duplicate id, unknown
label, invalid IRMA code, unreadable row, image no row labels) is left out of `Dataset.records` and listed in
`Dataset.problems`; with ``strict=True`` the reader raises `DatasetError` instead. Errors in the layout
itself (no such folder, a table without its key columns) always raise. Which files count as images, and
that hidden ones never do, is `cbmir.imaging.listing`'s to say.

To add a layout: a module here with `detect(path, **options)` and a reader, registered with
`register_layout`, imported below, and a tiny example archive in ``tests/datasets/test_layouts.py``.
"""

# The layout modules register themselves on import.
from cbmir.datasets.class_folders import read_class_folders
from cbmir.datasets.dicom import read_dicom_folder
from cbmir.datasets.irma import read_irma
from cbmir.datasets.medmnist import load_medmnist_image, read_medmnist
from cbmir.datasets.nih import NIH_FINDINGS, NIH_NO_FINDING, read_nih
from cbmir.datasets.pixels import load_pixels, read_pixels
from cbmir.datasets.records import (
    PROBLEM_KINDS,
    SPLIT_ALIASES,
    SPLITS,
    TASKS,
    Dataset,
    DatasetError,
    Problem,
    ProblemKind,
    Record,
    Task,
)
from cbmir.datasets.registry import Layout, LayoutMismatch, layouts, open_dataset, register_layout
from cbmir.datasets.split import stratified_split
from cbmir.imaging.listing import IMAGE_SUFFIXES
from cbmir.locations import Split

__all__ = [
    "IMAGE_SUFFIXES",
    "NIH_FINDINGS",
    "NIH_NO_FINDING",
    "PROBLEM_KINDS",
    "SPLITS",
    "SPLIT_ALIASES",
    "TASKS",
    "Dataset",
    "DatasetError",
    "Layout",
    "LayoutMismatch",
    "Problem",
    "ProblemKind",
    "Record",
    "Split",
    "Task",
    "layouts",
    "load_medmnist_image",
    "load_pixels",
    "open_dataset",
    "read_class_folders",
    "read_dicom_folder",
    "read_irma",
    "read_medmnist",
    "read_nih",
    "read_pixels",
    "register_layout",
    "stratified_split",
]
