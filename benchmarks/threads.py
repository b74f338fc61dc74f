"""Thread policy benchmark: the model alone in torch and in ONNX Runtime with each thread setting, on this
machine idle and with one other busy process beside it, to choose the inference thread policy.

    python benchmarks/threads.py --archive ../shared/data/irma2007-dev

The model: the default CPU model untrained (its architecture, embedding and preprocessing; the weights do not
change the speed), saved in a scratch folder and exported to ONNX there on 16 prepared radiographs of the
archive. Its input: the archive's radiographs prepared as the model's preprocessing does (uint8 N x H x W x
3, as `Embedder.prepare` makes them).

Settings: torch with 1 and 2 threads (`torch.set_num_threads`, then the `Embedder` with runtime="torch":
channels_last, inference mode; torch's inter-op pool is not used by one model run), and ONNX Runtime
sessions built here on the exported graph with 1 and 2 intra-op threads, spinning on and off
(`session.intra_op.allow_spinning`), one inter-op thread and sequential execution (the inter-op pool is
then not used). Each setting idle and busy: with one other CPU-bound process (`python -c "while True:
pass"`) started before the measurement and killed after it. Figures: images/s at batch 32 (consecutive
batches for about 6 s after a warm-up batch) and one-image latency p50/p99 (100 runs after five warm-up
runs, fewer if they would take over 12 s).

The policy is chosen per runtime by the busy images/s (the machine serves beside readers, other searches
and other programs), provided the idle rate stays within 10% of the best idle rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbmir.datasets import load_pixels
from cbmir.embed import Embedder, set_threads
from cbmir.graph import EMBEDDING_OUTPUT, INPUT_NAME, graph_for, head_output, session_options
from common import (
    DEFAULT_MODEL_NAME,
    RESULTS,
    OtherLoad,
    busy_process,
    cpu_description,
    exported_default_model,
    load_average,
    model_rate,
    one_image_latency,
    publish,
    run_and_publish,
    saved_figure,
)
from indexer.pipeline import read_archive

IMAGES = 64  # prepared radiographs cycled through by the measurements
IDLE_MARGIN = 0.10  # a policy may give up this much of the best idle rate for the best busy rate


def settings(cores: int) -> list[dict]:
    """Every setting measured: torch 1..cores threads, ONNX Runtime 1..cores intra-op threads x spinning."""
    counts = sorted({1, cores})
    torch_settings = [{"runtime": "torch", "threads": n, "spinning": None} for n in counts]
    onnx_settings = [{"runtime": "onnx", "threads": n, "spinning": spin} for n in counts for spin in (True, False)]
    return torch_settings + onnx_settings


def label(setting: dict) -> str:
    if setting["runtime"] == "torch":
        return f"torch, {setting['threads']} thread(s)"
    spinning = "spinning" if setting["spinning"] else "no spinning"
    return f"ONNX Runtime, {setting['threads']} intra-op thread(s), {spinning}"


def onnx_session(graph: Path, threads: int, spinning: bool):
    import onnxruntime

    options = session_options(threads, spinning)
    return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def runner(setting: dict, checkpoint, graph: Path) -> Callable[[np.ndarray], object]:
    """One model run on uint8 N x H x W x 3 in this setting."""
    if setting["runtime"] == "torch":
        torch.set_num_threads(setting["threads"])
        embedder = Embedder(checkpoint, runtime="torch", batch_size=32)
        return embedder.embed_inputs
    session = onnx_session(graph, setting["threads"], setting["spinning"])
    outputs = [EMBEDDING_OUTPUT, *(head_output(head) for head in checkpoint.model.head_sizes)]
    return lambda images: session.run(outputs, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})


def run(args) -> dict:
    archive_name, records = read_archive(args.archive)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, export_seconds = exported_default_model(Path(scratch) / "model", records, archive_name)
        graph = graph_for(checkpoint)
        print(f"exported in {export_seconds:.0f} s")
        step = max(1, len(records) // IMAGES)
        images = np.stack([checkpoint.pipeline(load_pixels(record)) for record in records[::step][:IMAGES]])
        load_before = load_average()
        if load_before > 0.5:
            print(f"warning: the one-minute load average is {load_before:.2f} before the idle measurements")
        rows = []
        for setting in settings(cores):
            measure = runner(setting, checkpoint, graph)
            for busy in (False, True):
                with OtherLoad() as other, busy_process(busy):
                    rate = model_rate(measure, images, batch=args.batch, seconds=args.seconds)
                    latency = one_image_latency(measure, images, runs=args.latency_runs)
                row = {**setting, "label": label(setting), "busy": busy, **rate, **latency, "other_cores": other.cores}
                rows.append(row)
                print(
                    f"{row['label']:50} {'busy' if busy else 'idle'}: {rate['images_per_second']:6.1f} images/s, "
                    f"one image p50 {latency['p50_ms']:6.1f} ms p99 {latency['p99_ms']:6.1f} ms"
                )
            del measure
    set_threads(None)  # the machine line of the page names the default again
    return {
        "archive": archive_name,
        "model": DEFAULT_MODEL_NAME,
        "input_size": int(images.shape[1]),
        "images": len(images),
        "batch": args.batch,
        "cores": cores,
        "cpu": cpu_description(),
        "load_average_before": load_before,
        "export_seconds": export_seconds,
        "rows": rows,
        "policy": choose(rows),
    }


def choose(rows: list[dict]) -> dict:
    """Per runtime, the setting with the best busy images/s among those within IDLE_MARGIN of the best idle
    images/s, with the figures it was chosen on."""
    chosen = {}
    for runtime in ("torch", "onnx"):
        idle = {r["label"]: r for r in rows if r["runtime"] == runtime and not r["busy"]}
        busy = {r["label"]: r for r in rows if r["runtime"] == runtime and r["busy"]}
        best_idle = max(r["images_per_second"] for r in idle.values())
        eligible = [name for name, r in idle.items() if r["images_per_second"] >= (1 - IDLE_MARGIN) * best_idle]
        name = max(eligible, key=lambda n: busy[n]["images_per_second"])
        others = {n: busy[n]["images_per_second"] for n in busy if n != name}
        chosen[runtime] = {
            "label": name,
            "threads": idle[name]["threads"],
            "spinning": idle[name]["spinning"],
            "idle_images_per_second": idle[name]["images_per_second"],
            "busy_images_per_second": busy[name]["images_per_second"],
            "best_idle_images_per_second": best_idle,
            "busy_images_per_second_of_the_others": others,
        }
    return chosen


def plot(summary: dict, path: Path) -> None:
    rows = summary["rows"]
    names = list(dict.fromkeys(r["label"] for r in rows))
    short = [n.replace("ONNX Runtime", "ORT").replace(" intra-op", "").replace("thread(s)", "thr") for n in names]
    positions = np.arange(len(names))
    with saved_figure(path, ncols=2, figsize=(11, 4.5)) as (_, axes):
        for offset, busy, colour in ((-0.2, False, "tab:blue"), (0.2, True, "tab:red")):
            figures = {r["label"]: r for r in rows if r["busy"] == busy}
            state = "busy process beside" if busy else "idle"
            axes[0].bar(
                positions + offset,
                [figures[n]["images_per_second"] for n in names],
                0.4,
                color=colour,
                label=state,
            )
            axes[1].bar(positions + offset, [figures[n]["p50_ms"] for n in names], 0.4, color=colour, label=state)
        for axis, ylabel in ((axes[0], f"images/s, batch {summary['batch']}"), (axes[1], "one image, p50 ms")):
            axis.set_xticks(positions, short, rotation=30, ha="right", fontsize=8)
            axis.set_ylabel(ylabel)
            axis.legend(fontsize=8)
            axis.grid(True, axis="y", alpha=0.3)
        axes[0].set_title("Model throughput (higher is better)")
        axes[1].set_title("One-image latency (lower is better)")


def markdown(summary: dict) -> str:
    rows = summary["rows"]
    lines = [
        (
            f"{summary['cpu']}. Model: {summary['model']}, input {summary['input_size']} px, exported to ONNX in "
            f"{summary['export_seconds']:.0f} s; inputs: {summary['images']} radiographs of `{summary['archive']}`, "
            'prepared (uint8 N x H x W x 3). Busy: one other process (`python -c "while True: pass"`) runs '
            "during the measurement. Torch runs through the `Embedder` (channels_last, inference mode; its "
            "figures include decoding the predictions, well under a millisecond per batch); ONNX Runtime "
            "sessions are built directly on the exported graph (one inter-op thread, sequential execution). "
            f"Images/s: batches of {summary['batch']} for about 6 s after a warm-up batch; latency: one image at a "
            "time, 100 runs after warm-up (fewer where they would take over 12 s). One-minute load average before "
            f"the run: "
            f"{summary['load_average_before']:.2f}. *Other programs' cores*: the cores that processes other "
            "than this benchmark (and the busy process it started) kept busy during the measurement, from "
            "/proc/stat; near 0 means the figures are this benchmark's alone."
        ),
        "",
        "![threads](benchmarks/results/threads.png)",
        "",
        "| runtime | threads | spinning | idle images/s | idle p50 ms | idle p99 ms | busy images/s | busy p50 ms | "
        "busy p99 ms | busy / idle images/s | other programs' cores, idle / busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["label"] for r in rows):
        idle = next(r for r in rows if r["label"] == name and not r["busy"])
        busy = next(r for r in rows if r["label"] == name and r["busy"])
        spinning = "–" if idle["spinning"] is None else ("on" if idle["spinning"] else "off")
        runtime = "torch" if idle["runtime"] == "torch" else "ONNX Runtime"
        lines.append(
            f"| {runtime} | {idle['threads']} | {spinning} | {idle['images_per_second']:.1f} | "
            f"{idle['p50_ms']:.1f} | {idle['p99_ms']:.1f} | {busy['images_per_second']:.1f} | "
            f"{busy['p50_ms']:.1f} | {busy['p99_ms']:.1f} | "
            f"{busy['images_per_second'] / idle['images_per_second']:.2f} | "
            f"{idle['other_cores']:.2f} / {busy['other_cores']:.2f} |"
        )
    policy = summary["policy"]
    lines += [
        "",
        "**Policy chosen by this run** (best busy rate among the settings within 10% of the best idle rate):",
        "",
    ]
    for runtime, name in (("onnx", "ONNX Runtime"), ("torch", "torch")):
        chosen = policy[runtime]
        others = ", ".join(
            f"{other}: {value:.1f}" for other, value in chosen["busy_images_per_second_of_the_others"].items()
        )
        lines.append(
            f"- {name}: **{chosen['label']}**: {chosen['busy_images_per_second']:.1f} images/s with a busy process "
            f"beside it, {chosen['idle_images_per_second']:.1f} idle (best idle of {name}: "
            f"{chosen['best_idle_images_per_second']:.1f}); the other settings busy: {others}."
        )
        mine = {r["busy"]: r for r in rows if r["label"] == chosen["label"]}
        busiest = max((r for r in rows if r["runtime"] == runtime and r["busy"]), key=lambda r: r["images_per_second"])
        if busiest["label"] != chosen["label"]:
            calm = next(r for r in rows if r["label"] == busiest["label"] and not r["busy"])
            lines.append(
                f"  Trade-off: {busiest['label']} holds more beside a busy process ({busiest['images_per_second']:.1f} "
                f"images/s, one image p50 {busiest['p50_ms']:.0f} / p99 {busiest['p99_ms']:.0f} ms, against "
                f"{mine[True]['p50_ms']:.0f} / {mine[True]['p99_ms']:.0f} ms) but gives up "
                f"{1 - calm['images_per_second'] / mine[False]['images_per_second']:.0%} of the idle rate "
                f"({calm['images_per_second']:.1f} images/s)."
            )
    cores = summary["cores"]
    current = {"onnx": (cores, False), "torch": (cores, None)}
    same = [
        runtime
        for runtime, setting in current.items()
        if (policy[runtime]["threads"], policy[runtime]["spinning"]) == setting
    ]
    verdict = {
        2: "the same as cbmir's policy",
        1: f"cbmir's policy for {'ONNX Runtime' if same == ['onnx'] else 'torch'} only",
        0: "not cbmir's policy",
    }[len(same)]
    lines += [
        "",
        (
            f"cbmir's policy (`cbmir.embed`): ONNX Runtime with every core ({cores}) as intra-op threads, one inter-op "
            f"thread, no spinning; torch with `$CBMIR_THREADS` or every core ({cores}). This run's choice is {verdict}."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=Path("../shared/data/irma2007-dev"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of batches per throughput figure")
    parser.add_argument("--latency-runs", type=int, default=100, help="one-image runs per latency figure")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: render results/threads.json again (plot and section, with its command and date)",
    )
    args = parser.parse_args()
    if args.render_only:
        stored = json.loads((RESULTS / "threads.json").read_text())
        stamp = {key: stored.pop(key) for key in ("command", "date", "machine")}
        stored["policy"] = choose(stored["rows"])
        plot(stored, RESULTS / "threads.png")
        publish("threads", stored, markdown(stored), stamp=stamp)
        print(markdown(stored))
        return
    started = time.perf_counter()
    run_and_publish("threads", run, args, plot=plot, plot_file="threads.png", markdown=markdown)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
