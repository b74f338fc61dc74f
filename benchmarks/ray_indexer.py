"""Ray indexer benchmark: `index_on_ray` (the indexer's stages as a Ray Data pipeline) against the
single-machine indexer (`index_records`) on the same radiographs, model and machine, one run each.

    python benchmarks/ray_indexer.py [--archive FOLDER ...]

By default on irma2007-dev (650 radiographs, the target's archive) and on the chest folder of the shared
data (2,443 radiographs of three collections), since Ray's start is a fixed cost that a longer run spreads.

The model is the CPU default untrained (its architecture, embedding and preprocessing; the weights do not
change the speed), saved to a scratch folder and exported to ONNX there, in the runtime the defaults choose
(ONNX Runtime, every core). The archive's files are read once beforehand, so every run finds them in the page
cache. Each run indexes the whole archive into a fresh index, batches of 32:

- single machine: `index_records` with --workers reader processes (as `cbmir index`);
- Ray, running instance: a Ray head on this machine (Ray's `Cluster`, every core, a small object store, no
  dashboard) started before the run, as a cluster is before `cbmir index --ray ADDRESS`; the run connects,
  reads and preprocesses in Ray tasks, embeds in the actor pool and writes in the driver. The target: at
  least 70% of the single machine's images/s. Its first job also starts Ray Data's own helper actors
  (detached: they stay on the cluster), so a second job on the same instance (a fresh index) shows what
  every later run pays;
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
import numpy as np
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
RUNS = {
    "single": "single machine",
    "ray": "Ray, running instance (its first job)",
    "ray_again": "Ray, running instance (a later job)",
    "ray_local": "Ray, local (started for the run)",
}
SHORT = {
    "single": "single\nmachine",
    "ray": "Ray,\nfirst job",
    "ray_again": "Ray,\nlater job",
    "ray_local": "Ray,\nlocal",
}
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


def run_archive(folder: Path, archive_path: Path, args) -> dict[str, Any]:
    """Every run of `RUNS` on one archive, each into a fresh index under `folder`."""
    archive, records = read_archive(archive_path)
    for record in records:
        Path(record.path).read_bytes()  # into the page cache: no run pays for the disk
    print(f"{archive}: {len(records)} images")
    checkpoint, export_seconds = exported_default_model(folder / "model", records, archive)
    print(f"default model saved and exported to ONNX in {export_seconds:.0f} s")
    embedder = Embedder(checkpoint, batch_size=BATCH)
    results: dict[str, Any] = {"archive": archive, "images": len(records), "runtime": embedder.runtime_description}

    def single() -> Summary:
        with Retrieval.open(folder / "single", embedder) as retrieval:
            return index_records(
                records, retrieval, dataset=archive, workers=args.workers, batch_size=BATCH, progress=False
            )

    def on_ray(address: str, index: str) -> Callable[[], Summary]:
        def go() -> Summary:
            with Retrieval.open(folder / index, embedder) as retrieval:
                return index_on_ray(
                    records,
                    retrieval,
                    model=folder / "model",
                    dataset=archive,
                    address=address,
                    batch_size=BATCH,
                    progress=False,
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
        results["ray_again"] = measured(on_ray(head.address, "ray-again"))
    finally:
        head.shutdown()
    results["ray_local"] = measured(on_ray("local", "ray-local"))
    for key in RUNS:
        results[key]["ratio"] = results[key]["images_per_second"] / results["single"]["images_per_second"]
    return results


def run(args) -> dict:
    set_threads(None)  # cbmir's policy: every core, as `cbmir index` sets it
    results: dict[str, Any] = {
        "workers": args.workers,
        "cpus": args.cpus,
        "batch": BATCH,
        "target": TARGET,
        "object_store_mib": args.object_store_mib,
        "local_object_store_mib": LOCAL_OBJECT_STORE_BYTES / 2**20,
        "model": DEFAULT_MODEL_NAME,
        "cpu": cpu_description(),
        "load_average_before": load_average(),
        "archives": [],
    }
    for number, archive in enumerate(args.archive):
        with tempfile.TemporaryDirectory() as scratch:
            results["archives"].append(run_archive(Path(scratch), archive, args))
        if number == 0:
            results["ratio"] = results["archives"][0]["ray"]["ratio"]  # the target's figure
    return results


def plot(results: dict, path: Path) -> None:
    archives = results["archives"]
    with saved_figure(path, figsize=(4.2 * len(archives), 3.9), ncols=len(archives)) as (_, axes_list):
        for axes, found in zip(np.atleast_1d(axes_list), archives, strict=True):
            rates = {key: found[key]["images_per_second"] for key in RUNS}
            names = [SHORT[key] for key in rates]
            bars = axes.bar(names, list(rates.values()), color=["C0", "C1", "C3", "C2"])
            axes.bar_label(bars, fmt="%.1f")
            goal = TARGET * rates["single"]
            axes.axhline(goal, color="grey", linestyle="--", linewidth=1)
            note = f"{TARGET:.0%} of single machine"
            axes.annotate(note, (3.4, goal), xytext=(0, 3), textcoords="offset points", ha="right", fontsize=8)
            axes.set_ylabel("images/s")
            axes.set_title(f"{found['images']} radiographs of {found['archive']}", fontsize=10)


def stages(seconds: dict[str, float]) -> str:
    return ", ".join(f"{stage} {value:.1f}" for stage, value in seconds.items())


def markdown(results: dict) -> str:
    first = results["archives"][0]
    met = results["ratio"] >= results["target"]
    lines = [
        f"![images/s per run](benchmarks/results/{PLOT})",
        "",
        "Each archive (files in the page cache) indexed into a fresh index per run by the "
        f"{results['model']} in {first['runtime']}, batches of {results['batch']}, one run each. Single "
        f"machine: `index_records`, {results['workers']} reader processes. Ray, running instance: a Ray head on "
        f"this machine ({results['cpus']} CPUs, {results['object_store_mib']} MiB object store) started before "
        "the run, which connects, reads and preprocesses in Ray tasks, embeds in the actor pool (one actor: one "
        "node) and writes in the driver; its first job also starts Ray Data's helper actors (statistics, actor "
        "locations, autoscaling; detached, so they stay), a later job finds them there. Ray, local: "
        f"`--ray local`, starting and stopping a Ray instance ({results['local_object_store_mib']:.0f} MiB object "
        f"store) within the run. {results['cpu']}; one-minute load average {results['load_average_before']:.2f} "
        "before the runs.",
        "",
        "*Start*: seconds until the run's first batch was written (processes, the model, for Ray the "
        "connection, its workers and the model actor); *after the start*: images/s from then to the end, the "
        "rate a long run approaches.",
        "",
        "| archive | run | images | seconds | images/s | / single machine | start s | images/s after the start "
        "| seconds per stage (summed over processes) | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for found in results["archives"]:
        for key, name in RUNS.items():
            row = found[key]
            lines.append(
                f"| {found['archive']} | {name} | {row['indexed']} | {row['seconds']:.1f} "
                f"| {row['images_per_second']:.1f} | {row['ratio']:.0%} | {row['start_seconds']:.1f} "
                f"| {row['images_per_second_after_start']:.1f} | {stages(row['stage_seconds'])} "
                f"| {row['other_cores']:.2f} |"
            )
    lines += [
        "",
        f"On {first['archive']}, Ray on a running instance / single machine: **{results['ratio']:.2f}** (its "
        f"first job), {first['ray_again']['ratio']:.2f} (a later job); the target of {results['target']:.0%} is "
        + ("**met**." if met else "**not met**."),
    ]
    for found in results["archives"]:
        after = found["ray_again"]["images_per_second_after_start"] / found["single"]["images_per_second_after_start"]
        lines[-1] += (
            f" {found['archive']}: a later job {found['ray_again']['ratio']:.2f} of the single machine over the "
            f"whole run, {after:.2f} after the start ({found['ray_again']['start_seconds']:.1f} s against "
            f"{found['single']['start_seconds']:.1f} s)."
        )
    lines += [
        "",
        "Ray Data's own statistics of the pipeline (`Dataset.stats()`), per operator: tasks (or actor calls), "
        "the operator's wall seconds, and the remote wall and CPU seconds its tasks spent in all.",
        "",
        "| archive | run | operator | tasks | wall s | remote wall s | remote CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for found in results["archives"]:
        for key in ("ray", "ray_again", "ray_local"):
            for op in found[key]["ray_operators"]:
                lines.append(
                    f"| {found['archive']} | {RUNS[key]} | `{op['operator']}` | {op['tasks']} | {op['seconds']:.1f} "
                    f"| {op.get('remote_wall_seconds', 0.0):.1f} | {op.get('remote_cpu_seconds', 0.0):.1f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = ROOT.parents[1] / "shared" / "data"
    parser.add_argument("--archive", type=Path, nargs="+", default=[shared / "irma2007-dev", shared / "chest"])
    parser.add_argument("--workers", type=int, default=2, help="the single machine's reader processes")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the running Ray instance")
    parser.add_argument("--object-store-mib", type=int, default=256, help="object store of the running instance")
    args = parser.parse_args()
    run_and_publish("ray_indexer", run, args, plot=plot, plot_file=PLOT, markdown=markdown)


if __name__ == "__main__":
    main()
