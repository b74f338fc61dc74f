"""Evaluation metrics and report files: pure functions on numpy arrays.

Three reports, each a plain JSON-ready dict with a ``kind`` key (`cbmir.metrics.reports`):
`classification_report` (one label per image), `multilabel_report` (any number of findings per image, e.g.
the 14 NIH chest findings) and `irma_report` (IRMA codes, with the ImageCLEF error score). `write_report`
(`cbmir.metrics.markdown`) stores reports as JSON and as Markdown; `plot_confusion_matrix` and
`plot_history` (`cbmir.metrics.plots`) draw PNGs. Every file is written atomically (`cbmir.files`).

A ratio whose denominator is zero (sensitivity of a class absent from the truth, PPV of a class never
predicted, ...) is None, never NaN, so the JSON stays valid and no reader mistakes it for a number. Bad input
is a `MetricsError` naming the argument and the reason.
"""

from cbmir.metrics.checks import MetricsError
from cbmir.metrics.markdown import MARKDOWN, write_report
from cbmir.metrics.plots import ANNOTATED_CLASSES, HISTORY_KEYS, plot_confusion_matrix, plot_history
from cbmir.metrics.reports import (
    FIGURES,
    IRMA_TABLES_NOTE,
    RANKING_FIGURES,
    classification_report,
    irma_report,
    multilabel_report,
)

__all__ = [
    "ANNOTATED_CLASSES",
    "FIGURES",
    "HISTORY_KEYS",
    "IRMA_TABLES_NOTE",
    "MARKDOWN",
    "RANKING_FIGURES",
    "MetricsError",
    "classification_report",
    "irma_report",
    "multilabel_report",
    "plot_confusion_matrix",
    "plot_history",
    "write_report",
]
