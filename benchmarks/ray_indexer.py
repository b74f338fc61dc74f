"""Ray indexer benchmark: `index_on_ray` (the indexer's stages as a Ray Data pipeline) against the
single-machine indexer (`index_records`) on the same radiographs, model and machine, one run each.

    python benchmarks/ray_indexer.py

The model is the CPU default untrained (its architecture, embedding and preprocessing; the weights do not
change the speed), saved to a scratch folder and exported to ONNX there, in the runtime the defaults choose
(ONNX Runtime, every core). The archive's files are read once beforehand, so every run finds them in the page
cache. Each run indexes the whole archive into a fresh index, batches of 32:

- single machine: `index_records` with --workers reader processes (as `cbmir index`);
- Ray, running instance: a Ray head on this machine (Ray's `Cluster`, every core, a small object store, no
  dashboard) started before the run, as a cluster is before `cbmir index --ray ADDRESS`; the run connects,
  reads and preprocesses in Ray tasks, embeds in the actor pool and writes in the driver. The target: at
  least 70% of the single machine's images/s;
- Ray, local: `cbmir index --ray local`, which starts a Ray instance for the run and stops it after, all
  counted.

Seconds per stage: the indexer's own (summed over the processes running each) and Ray Data's own statistics
of the pipeline's operators (`Dataset.stats()`: tasks, wall time of the operator, and the remote wall and
CPU time its tasks or actor calls spent). *Other cores*: what the rest of the machine kept busy meanwhile.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray.cluster_utils import Cluster

from cbmir.embed import Embedder, set_threads
from cbmir.search import Retrieval
from common import (
    DEFAULT_MODEL_NAME,
    ROOT,
    OtherLoad,
    cpu_description,
    exported_default_model,
    load_average,
    run_and_publish,
    saved_figure,
)
from indexer.pipeline import Summary, index_records, read_archive
from indexer.ray_pipeline import LOCAL_OBJECT_STORE_BYTES, RaySummary, index_on_ray

BATCH = 32
TARGET = 0.70  # Ray on a running instance / single machine, images/s
PLOT = "ray_indexer.png"
RUNS = {"single": "single machine", "ray": "Ray, running instance", "ray_local": "Ray, local (started for the run)"}
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def operators(stats: str) -> list[dict[str, Any]]:
    """Ray Data's per-operator figures, read from `Dataset.stats()`: name, tasks, the operator's wall
    seconds, and the total remote wall and CPU seconds of its tasks (or actor calls)."""
    found: list[dict[str, Any]] = []
    for line in stats.splitlines():
        head = re.match(r"Operator \d+ (.+?): (\d+) tasks executed, \d+ blocks produced in ([\d.]+)s", line)
        if head:
            found.append({"operator": head[1], "tasks": int(head[2]), "seconds": float(head[3])})
        total = re.match(r"\* Remote (wall|cpu) time: .*?([\d.]+)(us|ms|s) total", line.strip())
        if total and found:
            found[-1][f"remote_{total[1]}_seconds"] = float(total[2]) * UNITS[total[3]]
    return found


def measured(run: Callable[[], Summary]) -> dict[str, Any]:
    """One indexing run: images/s over its whole call, the indexer's stage seconds, the other cores."""
    before = load_average()
    with OtherLoad() as other:
        started = time.perf_counter()
        summary = run()
        seconds = time.perf_counter() - started
    row: dict[str, Any] = {
        "indexed": summary.indexed,
        "failed": sum(summary.failed.values()),
        "seconds": seconds,
        "images_per_second": summary.indexed / seconds,
        "stage_seconds": dict(summary.seconds),
        "other_cores": other.cores,
        "load_average_before": before,
    }
    if summary.first_batch is not None:  # the start, and the rate once every stage runs
        first_seconds, first_indexed = summary.first_batch
        row["start_seconds"] = first_seconds
        row["images_per_second_after_start"] = (summary.indexed - first_indexed) / (seconds - first_seconds)
    if isinstance(summary, RaySummary):
        row["ray_operators"] = operators(summary.ray_stats)
        row["ray_stats"] = summary.ray_stats
    print(f"{row['indexed']} images in {seconds:.1f} s: {row['images_per_second']:.1f} images/s")
    return row


def run(args) -> dict:
    set_threads(None)  # cbmir's policy: every core, as `cbmir index` sets it
    archive, records = read_archive(args.archive)
    for record in records:
        Path(record.path).read_bytes()  # into the page cache: no run pays for the disk
    results: dict[str, Any] = {
        "archive": archive,
        "images": len(records),
        "workers": args.workers,
        "cpus": args.cpus,
        "batch": BATCH,
        "target": TARGET,
        "object_store_mib": args.object_store_mib,
        "cpu": cpu_description(),
        "load_average_before": load_average(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        checkpoint, export_seconds = exported_default_model(folder / "model", records, archive)
        print(f"default model saved and exported to ONNX in {export_seconds:.0f} s")
        embedder = Embedder(checkpoint, batch_size=BATCH)
        results["model"], results["runtime"] = DEFAULT_MODEL_NAME, embedder.runtime_description

        def single() -> Summary:
            with Retrieval.open(folder / "single", embedder) as retrieval:
                return index_records(
                    records, retrieval, dataset=archive, workers=args.workers, batch_size=BATCH, progress=False
                )

        def on_ray(address: str, index: str) -> Callable[[], Summary]:
            def go() -> Summary:
                with Retrieval.open(folder / index, embedder) as retrieval:
                    return index_on_ray(
                        records, retrieval, model=folder / "model", dataset=archive, address=address, batch_size=BATCH
                    )

            return go

        results["single"] = measured(single)
        head = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": args.cpus,
                "include_dashboard": False,
                "object_store_memory": args.object_store_mib * 2**20,
            },
        )
        try:
            head.wait_for_nodes()
            results["ray"] = measured(on_ray(head.address, "ray"))
        finally:
            head.shutdown()
        results["ray_local"] = measured(on_ray("local", "ray-local"))
    results["local_object_store_mib"] = LOCAL_OBJECT_STORE_BYTES / 2**20
    results["ratio"] = results["ray"]["images_per_second"] / results["single"]["images_per_second"]
    results["ratio_local"] = results["ray_local"]["images_per_second"] / results["single"]["images_per_second"]
    return results


def plot(results: dict, path: Path) -> None:
    rates = {key: results[key]["images_per_second"] for key in RUNS}
    with saved_figure(path, figsize=(7, 3.8)) as (_, axes):
        bars = axes.bar(
            [RUNS[key].replace(", ", ",\n") for key in rates], list(rates.values()), color=["C0", "C1", "C2"]
        )
        axes.bar_label(bars, fmt="%.1f")
        goal = TARGET * rates["single"]
        axes.axhline(goal, color="grey", linestyle="--", linewidth=1)
        note = f"{TARGET:.0%} of single machine"
        axes.annotate(note, (2.4, goal), xytext=(0, 3), textcoords="offset points", ha="right", fontsize=8)
        axes.set_ylabel("images/s")
        axes.set_title(f"{results['images']} radiographs of {results['archive']}, batches of {results['batch']}")


def stages(seconds: dict[str, float]) -> str:
    return ", ".join(f"{stage} {value:.1f}" for stage, value in seconds.items())


def markdown(results: dict) -> str:
    met = results["ratio"] >= results["target"]
    lines = [
        f"![images/s per run](benchmarks/results/{PLOT})",
        "",
        f"The {results['images']} radiographs of `{results['archive']}` (files in the page cache) indexed into a "
        f"fresh index per run by the {results['model']} in {results['runtime']}, batches of {results['batch']}, "
        f"one run each. Single machine: `index_records`, {results['workers']} reader processes. Ray, running "
        f"instance: a Ray head on this machine ({results['cpus']} CPUs, {results['object_store_mib']} MiB object "
        "store) started before the run, which connects, reads and preprocesses in Ray tasks, embeds in the actor "
        "pool (one actor: one node) and writes in the driver. Ray, local: `--ray local`, starting and stopping a "
        f"Ray instance ({results['local_object_store_mib']:.0f} MiB object store) within the run. "
        f"{results['cpu']}; one-minute load average {results['load_average_before']:.2f} before the runs.",
        "",
        "*Start*: seconds until the run's first batch was written (processes, the model, for Ray the "
        "connection, its workers and the model actor); *after the start*: images/s from then to the end, the "
        "rate a long run approaches.",
        "",
        "| run | images | seconds | images/s | / single machine | start s | images/s after the start "
        "| seconds per stage (summed over processes) | other cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, name in RUNS.items():
        row = results[key]
        ratio = row["images_per_second"] / results["single"]["images_per_second"]
        lines.append(
            f"| {name} | {row['indexed']} | {row['seconds']:.1f} | {row['images_per_second']:.1f} | {ratio:.0%} "
            f"| {row['start_seconds']:.1f} | {row['images_per_second_after_start']:.1f} "
            f"| {stages(row['stage_seconds'])} | {row['other_cores']:.2f} |"
        )
    lines += [
        "",
        f"Ray on a running instance / single machine: **{results['ratio']:.2f}**, the target of "
        f"{results['target']:.0%} is " + ("**met**." if met else "**not met**.") + " After the start: Ray "
        f"{results['ray']['images_per_second_after_start']:.1f} images/s against "
        f"{results['single']['images_per_second_after_start']:.1f}, "
        f"{results['ray']['images_per_second_after_start'] / results['single']['images_per_second_after_start']:.2f}.",
        "",
        "Ray Data's own statistics of the pipeline (`Dataset.stats()`), per operator: tasks (or actor calls), "
        "the operator's wall seconds, and the remote wall and CPU seconds its tasks spent in all.",
        "",
        "| run | operator | tasks | wall s | remote wall s | remote CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("ray", "ray_local"):
        for op in results[key]["ray_operators"]:
            lines.append(
                f"| {RUNS[key]} | `{op['operator']}` | {op['tasks']} | {op['seconds']:.1f} "
                f"| {op.get('remote_wall_seconds', 0.0):.1f} | {op.get('remote_cpu_seconds', 0.0):.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ROOT.parents[1] / "shared" / "data" / "irma2007-dev")
    parser.add_argument("--workers", type=int, default=2, help="the single machine's reader processes")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the running Ray instance")
    parser.add_argument("--object-store-mib", type=int, default=256, help="object store of the running instance")
    args = parser.parse_args()
    run_and_publish("ray_indexer", run, args, plot=plot, plot_file=PLOT, markdown=markdown)


if __name__ == "__main__":
    main()
