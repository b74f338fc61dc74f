"""Report files: a set of reports (`cbmir.metrics.reports`) written as one JSON file and one Markdown file
with a table per figure set. Both texts are built before anything is written, and each file is written
atomically, so a report that cannot be rendered leaves no file behind and a reader never sees half of one."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cbmir.files import write_atomically
from cbmir.irma import AXES
from cbmir.metrics.checks import MetricsError
from cbmir.metrics.reports import FIGURES, RANKING_FIGURES


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def _figure_tables(report: dict, label: str, figures: dict[str, str]) -> list[str]:
    header = [label, "Support", *figures.values()]
    per_class = [
        [name, report["per_class"][name]["support"], *(report["per_class"][name][key] for key in figures)]
        for name in report["classes"]
    ]
    averages = [[kind, row["support"], *(row[key] for key in figures)] for kind, row in report["averages"].items()]
    return [
        f"## Per {label.lower()}",
        "",
        *_table(header, per_class),
        "",
        "## Averages",
        "",
        *_table(["Average", "Support", *figures.values()], averages),
    ]


def _classification_markdown(report: dict) -> list[str]:
    summary = [
        f"- Images: {report['n']}",
        f"- Classes: {len(report['classes'])}",
        f"- Accuracy: {_cell(report['accuracy'])}",
    ]
    if "log_loss" in report:
        summary.append(f"- Log loss: {_cell(report['log_loss'])}")
    return [*summary, "", *_figure_tables(report, "Class", FIGURES)]


def _multilabel_markdown(report: dict) -> list[str]:
    summary = [
        f"- Images: {report['n']}",
        f"- Findings: {len(report['classes'])}",
        f"- Threshold: {report['threshold']:g} (a finding is predicted when its score is at least this)",
    ]
    return [*summary, "", *_figure_tables(report, "Finding", {**RANKING_FIGURES, **FIGURES})]


def _irma_markdown(report: dict) -> list[str]:
    lines = [f"- Images: {report['n']}", f"- Accuracy (whole code): {_cell(report['accuracy'])}"]
    if "error_score" in report:
        lines += [
            f"- ImageCLEF error score: {_cell(report['error_score'])} "
            f"(mean per image {_cell(report['mean_error_score'])})"
        ]
    else:
        lines += [f"- Note: {report['note']}"]
    rows = [[axis, report["axis_accuracy"][axis]] for axis in AXES]
    return [*lines, "", "## Accuracy per axis", "", *_table(["Axis", "Accuracy"], rows)]


# Each report kind with the title and the body of its Markdown file.
MARKDOWN: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "classification": ("Classification", _classification_markdown),
    "multilabel": ("Multi-label classification", _multilabel_markdown),
    "irma": ("IRMA codes", _irma_markdown),
}


def write_report(sections: Mapping[str, dict], folder: Path, name: str = "evaluation") -> tuple[Path, Path]:
    """Write reports as ``name.json`` (section name -> report; sorted keys, indent 2) and ``name.md`` (one
    chapter per section); returns both paths.

    Each file is written atomically. The folder is created when missing. Both texts are built before
    anything is written, so a report that cannot be rendered leaves no file behind.
    """
    if not isinstance(sections, Mapping) or not sections:
        raise MetricsError("no reports given: write_report takes a mapping of section name -> report")
    for section, report in sections.items():
        kind = report.get("kind") if isinstance(report, dict) else None
        if kind not in MARKDOWN:
            raise MetricsError(
                f"section {section!r} is not a cbmir report: 'kind' is {kind!r}, expected one of "
                f"{', '.join(MARKDOWN)} (build it with classification_report, multilabel_report or irma_report)"
            )
    if not name or Path(name).name != name or name.startswith("."):
        raise MetricsError(f"report name {name!r} must be a plain file name without folders or a leading dot")
    try:
        as_json = json.dumps(dict(sections), sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise MetricsError(f"the report cannot be written as JSON: {error}") from error
    lines = [f"# Evaluation: {name}"]
    for section, report in sections.items():
        title, body = MARKDOWN[report["kind"]]
        lines += ["", f"## {section} ({title.lower()})", ""]
        lines += [f"#{line}" if line.startswith("#") else line for line in body(report)]
    markdown = "\n".join(lines) + "\n"
    folder = Path(folder)
    paths = folder / f"{name}.json", folder / f"{name}.md"
    for path, text in zip(paths, (as_json, markdown), strict=True):
        try:
            write_atomically(path, text.encode("utf-8"))
        except OSError as error:
            raise MetricsError(f"cannot write {path}: {error.strerror or error}") from error
    return paths
