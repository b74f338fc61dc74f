"""Shared by the benchmark scripts: the machine description, the results file and the section of
BENCHMARKS.md that each script regenerates (between its own start and end markers); for the speed
scripts also the default CPU model (saved and exported to ONNX), a busy process beside a measurement, and
the model-only timings (images/s at a batch, one-image latency)."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from cbmir.checkpoint import Checkpoint, load_checkpoint, new_card, save_checkpoint
from cbmir.datasets import Record, load_pixels
from cbmir.errors import CbmirError
from cbmir.export import export_graph
from cbmir.imaging.preprocess import preset
from cbmir.labels import LabelSchema
from cbmir.models import create_model
from cbmir.models.inference import images_to_tensor
from cbmir.train import TrainConfig
from cbmir.train.data import choose_task

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


def cpu_description() -> str:
    """What `lscpu` says of the processor (model, cores, threads per core, hypervisor), in one line."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
            if ":" in line
        )
    except (OSError, subprocess.CalledProcessError):
        return f"{os.cpu_count()} logical CPUs (lscpu unavailable)"
    get = {key.strip(): value.strip() for key, value in fields.items()}.get
    parts = [
        f"{get('CPU(s)', '?')} CPUs ({get('Model name', '?')})",
        f"{get('Core(s) per socket', '?')} core(s) per socket, {get('Thread(s) per core', '?')} thread(s) per core",
    ]
    if get("Hypervisor vendor"):
        parts.append(f"{get('Hypervisor vendor')} guest")
    return "lscpu: " + ", ".join(parts) + f"; nproc: {os.cpu_count()}"


def command() -> str:
    return "python " + " ".join(shlex.quote(arg) for arg in [os.path.relpath(sys.argv[0], ROOT.parent), *sys.argv[1:]])


def publish(name: str, results: dict, markdown: str, *, stamp: dict | None = None) -> None:
    """Write results/NAME.json and replace NAME's section of BENCHMARKS.md with `markdown`, headed by the
    exact command, the date and the machine (those of this run, or `stamp`'s when the results are those of
    an earlier run, rendered again)."""
    stamp = stamp or {
        "command": command(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
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


# -- the speed scripts ------------------------------------------------------------------------------------------

DEFAULT_MODEL_NAME = f"untrained {TrainConfig().model} (CPU default)"
EXPORT_SAMPLES = 16


def default_checkpoint(records: Sequence[Record]) -> Checkpoint:
    """An untrained model of the CPU default for these records' labels (ImageNet trunk, random heads): the
    architecture, embedding and preprocessing of the default; the weights do not change the speed."""
    config = TrainConfig()
    labelled = [replace(record, labels=record.labels or ("unlabelled",)) for record in records]
    schema = LabelSchema.from_labels(choose_task(labelled), [record.labels for record in labelled])
    model = create_model(config.model, schema.head_sizes, pretrained=True, embedding_dim=config.embedding_dim).eval()
    return Checkpoint(model, new_card(model, schema, preset(config.preset, size=model.input_size)))


def exported_default_model(folder: Path, records: Sequence[Record], archive: str) -> tuple[Checkpoint, float]:
    """The default CPU model saved to `folder` and exported to ONNX (model.onnx) on the first
    `EXPORT_SAMPLES` records, prepared as the model's preprocessing does; returns the saved checkpoint and
    the seconds the export took."""
    unsaved = default_checkpoint(records)
    checkpoint = load_checkpoint(save_checkpoint(folder, unsaved.model, unsaved.card))
    samples = np.stack([checkpoint.pipeline(load_pixels(record)) for record in records[:EXPORT_SAMPLES]])
    started = time.perf_counter()
    export_graph(checkpoint, samples, described=f"prepared {archive} radiographs")
    return load_checkpoint(folder), time.perf_counter() - started


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child is killed when the process that started it dies, however it dies."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextmanager
def busy_process(busy: bool = True) -> Iterator[None]:
    """With `busy`, one other CPU-bound process (`python -c "while True: pass"`) runs on the machine for the
    duration of the block: started before it (and given a moment to get going), killed after it, also when
    the block fails, and killed by the kernel if this script dies first."""
    if not busy:
        yield
        return
    process = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"],
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    try:
        time.sleep(0.5)
        yield
    finally:
        process.kill()
        process.wait()


def _busy_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine, not idle, since boot (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class OtherLoad:
    """How many cores other programs kept busy during a block (`with OtherLoad() as other: ...;
    other.cores`): the machine's busy CPU time minus this process's and its waited-for children's (the
    busy process, index workers and servers started here), over the block's wall time. Near 0 when the
    machine was ours alone; Linux only (0 elsewhere)."""

    cores = 0.0

    def __enter__(self) -> OtherLoad:
        self._available = Path("/proc/stat").exists()
        if self._available:
            self._start = (time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._available:
            wall, busy, own = self._start
            elapsed = time.perf_counter() - wall
            others = (_busy_cpu_seconds() - busy) - (_own_cpu_seconds() - own)
            self.cores = max(0.0, others / elapsed) if elapsed > 0 else 0.0
            if self.cores > 0.15:
                print(f"warning: other programs kept {self.cores:.2f} cores busy during this measurement")


def load_average() -> float:
    """The one-minute load average: near 0 before an idle measurement, or another program is running."""
    return os.getloadavg()[0]


def model_rate(
    run: Callable[[np.ndarray], object], images: np.ndarray, *, batch: int = 32, seconds: float = 6.0
) -> dict:
    """Images per second of `run` (a model run on uint8 N x H x W x 3) over consecutive batches of `images`
    (cycled), after one warm-up batch: as many batches as fit in `seconds`, at least two."""
    chunks = [images[start : start + batch] for start in range(0, len(images) - batch + 1, batch)] or [images]
    run(chunks[0])  # warm-up
    done, elapsed, turn = 0, 0.0, 0
    while turn < 2 or elapsed < seconds:
        chunk = chunks[turn % len(chunks)]
        started = time.perf_counter()
        run(chunk)
        elapsed += time.perf_counter() - started
        done, turn = done + len(chunk), turn + 1
    return {"images_per_second": done / elapsed, "images": done, "batch": batch, "seconds": elapsed}


def one_image_latency(
    run: Callable[[np.ndarray], object], images: np.ndarray, *, runs: int = 100, seconds: float = 12.0
) -> dict:
    """p50/p99 milliseconds of `run` on one image at a time, after five warm-up runs: `runs` runs, fewer if
    they would take longer than `seconds` (at least 20)."""
    for number in range(5):
        run(images[number % len(images) : number % len(images) + 1])
    durations: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(durations) < runs and (len(durations) < 20 or time.perf_counter() < deadline):
        number = len(durations) % len(images)
        started = time.perf_counter()
        run(images[number : number + 1])
        durations.append(time.perf_counter() - started)
    values = np.array(durations) * 1e3
    return {"p50_ms": float(np.median(values)), "p99_ms": float(np.quantile(values, 0.99)), "runs": len(values)}
