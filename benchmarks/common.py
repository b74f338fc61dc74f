"""Shared by the benchmark scripts: the machine description, the results file and the section of
BENCHMARKS.md that each script regenerates (between its own start and end markers)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from cbmir.embed import images_to_tensor
from cbmir.errors import CbmirError
from cbmir.models import create_model

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PAGE = ROOT.parent / "BENCHMARKS.md"


def machine() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )


def command() -> str:
    return "python " + " ".join(shlex.quote(arg) for arg in [os.path.relpath(sys.argv[0], ROOT.parent), *sys.argv[1:]])


def publish(name: str, results: dict, markdown: str) -> None:
    """Write results/NAME.json and replace NAME's section of BENCHMARKS.md with `markdown`, headed by the
    exact command, the date and the machine."""
    stamp = {"command": command(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**stamp, **results}, indent=2, sort_keys=True) + "\n")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = "\n".join(
        [
            start,
            f"Command: `{stamp['command']}`  ",
            f"Date: {stamp['date']}  ",
            f"Machine: {stamp['machine']}",
            "",
            markdown.strip(),
            end,
        ]
    )
    page = PAGE.read_text() if PAGE.exists() else "# Benchmarks\n\nEvery section is written by its script.\n"
    if start in page and end in page:
        page = page[: page.index(start)] + section + page[page.index(end) + len(end) :]
    else:
        page = page.rstrip() + f"\n\n## {name}\n\n{section}\n"
    PAGE.write_text(page)


@torch.inference_mode()
def frozen_features(images: np.ndarray, model_name: str = "efficientnet-lite0") -> np.ndarray:
    """The untrained trunk features of a packaged ImageNet model (by default the plain Lite0's 1280 pooled
    features)."""
    model = create_model(model_name, {"label": 2}, pretrained=True, input_size=images.shape[1]).eval()
    model.to(memory_format=torch.channels_last)
    batches = [
        model.trunk_features(images_to_tensor(images[i : i + 32], torch.device("cpu"))).numpy()
        for i in range(0, len(images), 32)
    ]
    return np.concatenate(batches)


@contextmanager
def saved_figure(path: Path, **subplots):
    """A matplotlib figure and its axes (plt.subplots(**subplots)), written to `path` at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(**subplots)
    try:
        yield figure, axes
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)


def run_and_publish(name: str, run: Callable, args, *, plot: Callable, plot_file: str, markdown: Callable) -> None:
    """Run a benchmark (`run(args)` gives its results), plot and publish them and print the markdown. A
    `CbmirError` (a bad dataset, missing tables) is one line on stderr and exit status 2."""
    try:
        summary = run(args)
    except CbmirError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    RESULTS.mkdir(exist_ok=True)
    plot(summary, RESULTS / plot_file)
    text = markdown(summary)
    publish(name, summary, text)
    print(text)
