"""PACS benchmark: radiographs indexed from a local Orthanc over DICOMweb (`cbmir sync`) against the same images
indexed from files, in one run, and the rate at which the C-STORE listener (`cbmir listen`) receives them.

    python benchmarks/pacs.py

The 650 radiographs of irma2007-dev are written once as DICOM files (CR Image Storage, MONOCHROME2, 8 bits,
Explicit VR Little Endian, new UIDs, one study each, no patient data) to `--work`/dicoms and reused. The model is
the CPU default untrained (its architecture, embedding and preprocessing; the weights do not change the speed),
exported to ONNX, in the runtime the defaults choose; one embedder serves every measurement. Each path runs once
on --warm-up images first (into an index of its own), then once measured, into a fresh index:

- files: the DICOM files indexed from disk (`index_records`, --workers, batches of 32);
- DICOMweb sync: Orthanc (fresh, in `--work`/orthanc, on this machine) holding the same files (uploaded, not
  timed), synced with `sync_pacs` (the same workers and batch): listing (QIDO-RS), fetching (WADO-RS) and
  reading in the workers, model, write. The target: at least 80% of the files' images/s;
- C-STORE: a `Listener` (batches as `cbmir listen` makes them) receives the files, read into memory beforehand,
  from one association of a sender in its own process (as a modality is): acknowledged/s until the last
  answer, indexed/s until `stop()` returns (everything received is indexed by then).

CPU seconds per measurement are those of this process with its index workers, of Orthanc (a child process it does
not wait for), and of the C-STORE sender; *other cores*: what the rest of the machine kept busy (/proc/stat).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydantic import SecretStr
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.pacs.orthanc
from cbmir.checkpoint import Checkpoint
from cbmir.datasets import Record, load_pixels
from cbmir.embed import Embedder, set_threads
from cbmir.pacs import Pacs, PacsSettings
from cbmir.search import Retrieval
from common import (
    DEFAULT_MODEL_NAME,
    ROOT,
    cpu_description,
    exported_default_model,
    load_average,
    run_and_publish,
    saved_figure,
)
from indexer.listener import SUCCESS, Listener
from indexer.pacs import sync_pacs
from indexer.pipeline import Summary, index_records, read_archive
from tests.pacs.orthanc import Orthanc, free_ports

CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
STUDY_DATES = ("20240105", "20240610", "20250320")
BATCH = 32
TARGET = 0.80  # DICOMweb sync / files, images/s
PLOT = "pacs.png"
BARS = {
    "files": "files",
    "sync": "DICOMweb sync\n(Orthanc)",
    "acknowledged": "C-STORE\nacknowledged",
    "received_indexed": "C-STORE\nindexed",
}


# -- the DICOM files --------------------------------------------------------------------------------------------


def dicom_files(records: Sequence[Record], folder: Path) -> list[Path]:
    """Each record as a DICOM file `folder`/<id>.dcm, written unless it is already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, written = [], 0
    for number, record in enumerate(records):
        path = folder / f"{record.id}.dcm"
        if not path.exists():
            dataset = radiograph_dataset(load_pixels(record), STUDY_DATES[number % len(STUDY_DATES)])
            dataset.save_as(path.with_suffix(".partial"), enforce_file_format=True)
            path.with_suffix(".partial").replace(path)  # a run killed while writing leaves no half file
            written += 1
        paths.append(path)
    if written:
        print(f"{written} DICOM files written to {folder}")
    return paths


def radiograph_dataset(pixels: np.ndarray, study_date: str) -> Dataset:
    """An 8-bit MONOCHROME2 CR image in its own new study, without patient data."""
    if pixels.ndim != 2 or pixels.dtype.name != "uint8":
        raise ValueError(f"expected 8-bit grey pixels, got {pixels.dtype} {pixels.shape}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = "093000"
    ds.Modality = "CR"
    ds.Manufacturer = "cbmir benchmarks"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    return ds


# -- measuring ----------------------------------------------------------------------------------------------------


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle since boot (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _process_seconds(pid: int | None) -> float:
    """CPU seconds of process `pid` (all its threads), 0 without one."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_use(server: int | None = None) -> Iterator[dict[str, float]]:
    """The block's wall seconds and CPU seconds: this process with the children it waited for (`own`), the
    process `server` (Orthanc), and the cores the rest of the machine kept busy (`other_cores`)."""
    usage: dict[str, float] = {"load_average_before": load_average()}
    start = (time.perf_counter(), _machine_busy_seconds(), _own_seconds(), _process_seconds(server))
    yield usage
    wall = time.perf_counter() - start[0]
    own, orthanc = _own_seconds() - start[2], _process_seconds(server) - start[3]
    usage.update(
        wall_seconds=wall,
        own_cpu_seconds=own,
        orthanc_cpu_seconds=orthanc,
        other_cores=max(0.0, (_machine_busy_seconds() - start[1] - own - orthanc) / wall),
    )
    if usage["other_cores"] > 0.15:
        print(f"warning: other programs kept {usage['other_cores']:.2f} cores busy during this measurement")


def indexing_row(summary: Summary, usage: dict[str, float]) -> dict[str, Any]:
    return {
        "indexed": summary.indexed,
        "failed": sum(summary.failed.values()),
        "wall_seconds": summary.wall_seconds,
        "images_per_second": summary.indexed / summary.wall_seconds,
        "stage_seconds": dict(summary.seconds),
        **usage,
    }


# -- the three paths ----------------------------------------------------------------------------------------------


def from_files(paths: list[Path], embedder: Embedder, folder: Path, workers: int) -> dict[str, Any]:
    """The DICOM files indexed into a fresh index in `folder`."""
    records = [Record(path.stem, path, (), "dicom-files") for path in paths]
    with Retrieval.open(folder, embedder) as retrieval, cpu_use() as usage:
        summary = index_records(records, retrieval, dataset="files", workers=workers, batch_size=BATCH, progress=False)
    return indexing_row(summary, usage)


def from_pacs(orthanc: Orthanc, server: int | None, embedder: Embedder, folder: Path, workers: int) -> dict[str, Any]:
    """Everything Orthanc holds synced over DICOMweb into a fresh index in `folder`."""
    settings = PacsSettings(pacs_user=orthanc.user, pacs_password=SecretStr(orthanc.password))
    pacs = Pacs(orthanc.dicomweb_url, settings)
    with Retrieval.open(folder, embedder) as retrieval, cpu_use(server) as usage:
        summary = sync_pacs(pacs, retrieval, dataset="pacs", workers=workers, batch_size=BATCH, progress=False)
    return indexing_row(summary, usage)


def send(port: int, paths: list[str], answer: Connection) -> None:
    """The C-STORE sender (its own process): every file read into memory, then sent in one association.
    Answers the statuses, the monotonic clock at the association request and at the last answer, and its CPU
    seconds while sending and in all."""
    datasets = [pydicom.dcmread(path) for path in paths]
    sender = AE(ae_title="MODALITY")
    sender.add_requested_context(CR_IMAGE, ExplicitVRLittleEndian)
    cpu, started = time.process_time(), time.monotonic()
    association = sender.associate("127.0.0.1", port, ae_title="CBMIR")
    if not association.is_established:
        raise RuntimeError(f"the listener on port {port} refused the association")
    statuses = []
    for dataset in datasets:
        status = association.send_c_store(dataset)
        statuses.append(int(status.Status) if status else -1)
    finished = time.monotonic()
    association.release()
    answer.send(
        {
            "statuses": statuses,
            "started": started,
            "finished": finished,
            "cpu": time.process_time() - cpu,
            "cpu_total": time.process_time(),
        }
    )


def received(paths: list[Path], embedder: Embedder, folder: Path) -> dict[str, Any]:
    """The files pushed by C-STORE to a listener indexing into a fresh index in `folder`."""
    [port] = free_ports(1)
    context = multiprocessing.get_context("spawn")  # this process runs ONNX Runtime threads: no fork
    ours, theirs = context.Pipe(duplex=False)
    sender = context.Process(target=send, args=(port, [str(path) for path in paths], theirs))
    with Retrieval.open(folder, embedder) as retrieval, cpu_use() as usage, Listener(retrieval, port=port) as listener:
        sender.start()
        theirs.close()  # the sender's end: a sender that dies ends `recv` with EOFError
        sent = ours.recv()
        listener.stop()
        indexed_at = time.monotonic()
        sender.join()
    if sent["statuses"] != [SUCCESS] * len(paths) or listener.stats.refused:
        raise RuntimeError(f"the listener did not acknowledge every instance: {sorted(set(sent['statuses']))}")
    summary = listener.stats.summary
    acknowledged_seconds = sent["finished"] - sent["started"]
    indexed_seconds = indexed_at - sent["started"]
    return {
        "acknowledged": len(sent["statuses"]),
        "indexed": summary.indexed,
        "failed": sum(summary.failed.values()),
        "acknowledged_seconds": acknowledged_seconds,
        "acknowledged_per_second": len(sent["statuses"]) / acknowledged_seconds,
        "indexed_seconds": indexed_seconds,
        "indexed_per_second": summary.indexed / indexed_seconds,
        "stage_seconds": dict(summary.seconds),
        "listener_batch_size": listener.batch_size,
        "listener_batch_seconds": listener.batch_seconds,
        "sender_cpu_seconds": sent["cpu"],
        **usage,
        "own_cpu_seconds": usage["own_cpu_seconds"] - sent["cpu_total"],  # without the sender's start and reading
    }


# -- the run ------------------------------------------------------------------------------------------------------


def model(records: list[Record], archive: str, folder: Path) -> Checkpoint:
    """The default CPU model saved to `folder` (made afresh) and exported to ONNX."""
    shutil.rmtree(folder, ignore_errors=True)
    checkpoint, seconds = exported_default_model(folder, records, archive)
    print(f"default model saved and exported to ONNX in {seconds:.0f} s")
    return checkpoint


def run(args) -> dict:
    set_threads(None)  # cbmir's policy: every core, as `cbmir sync`, `cbmir index` and `cbmir listen` set it
    archive, records = read_archive(args.archive)
    work: Path = args.work
    paths = dicom_files(records, work / "dicoms")
    warm, measured = paths[: args.warm_up], paths
    results: dict[str, Any] = {
        "archive": archive,
        "images": len(paths),
        "warm_up_images": len(warm),
        "workers": args.workers,
        "batch": BATCH,
        "target": TARGET,
        "cpu": cpu_description(),
        "load_average_before": load_average(),
        "dicom_bytes": sum(path.stat().st_size for path in paths),
    }
    if results["load_average_before"] > 0.5:
        print(f"warning: the one-minute load average is {results['load_average_before']:.2f}: the machine is not idle")
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        folder = Path(scratch)
        embedder = Embedder(model(records, archive, folder / "model"))
        results["model"], results["runtime"] = DEFAULT_MODEL_NAME, embedder.runtime_description

        from_files(warm, embedder, folder / "files-warm-up", args.workers)
        results["files"] = files = from_files(measured, embedder, folder / "files", args.workers)
        print(f"files: {files['images_per_second']:.1f} images/s")

        shutil.rmtree(work / "orthanc", ignore_errors=True)
        orthanc = Orthanc(work / "orthanc")
        try:
            orthanc.start()
            server = orthanc.pid
            orthanc.upload_files(warm)
            from_pacs(orthanc, server, embedder, folder / "sync-warm-up", args.workers)
            started = time.perf_counter()
            orthanc.upload_files(measured[len(warm) :])
            results["upload_seconds"] = time.perf_counter() - started
            results["sync"] = sync = from_pacs(orthanc, server, embedder, folder / "sync", args.workers)
        finally:
            orthanc.close()
            shutil.rmtree(work / "orthanc" / "storage", ignore_errors=True)  # a copy of the files; the log stays
        results["ratio"] = sync["images_per_second"] / files["images_per_second"]
        print(f"DICOMweb sync: {sync['images_per_second']:.1f} images/s, {results['ratio']:.2f} of the files' rate")

        received(warm, embedder, folder / "received-warm-up")
        results["cstore"] = cstore = received(measured, embedder, folder / "received")
        print(
            f"C-STORE: {cstore['acknowledged_per_second']:.1f} acknowledged/s, "
            f"{cstore['indexed_per_second']:.1f} indexed/s"
        )
    return results


def plot(results: dict, path: Path) -> None:
    rates = {
        "files": results["files"]["images_per_second"],
        "sync": results["sync"]["images_per_second"],
        "acknowledged": results["cstore"]["acknowledged_per_second"],
        "received_indexed": results["cstore"]["indexed_per_second"],
    }
    with saved_figure(path, figsize=(7, 3.8)) as (_, axes):
        bars = axes.bar([BARS[key] for key in rates], list(rates.values()), color=["C0", "C1", "C2", "C3"])
        axes.bar_label(bars, fmt="%.1f")
        axes.axhline(TARGET * rates["files"], color="grey", linestyle="--", linewidth=1)
        axes.annotate(
            f"{TARGET:.0%} of files",
            (3.4, TARGET * rates["files"]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="right",
            fontsize=8,
            color="grey",
        )
        axes.set_ylabel("images/s")
        axes.set_title(f"{results['images']} radiographs of {results['archive']}, {results['workers']} workers")


def stages(seconds: dict[str, float]) -> str:
    return ", ".join(f"{stage} {value:.1f}" for stage, value in seconds.items())


def markdown(results: dict) -> str:
    files, sync, cstore = results["files"], results["sync"], results["cstore"]
    met = results["ratio"] >= results["target"]
    sender = f"{cstore['own_cpu_seconds']:.1f} (sender {cstore['sender_cpu_seconds']:.1f})"
    rows = [
        (
            "files (`index_records`)",
            files,
            files["images_per_second"],
            files["wall_seconds"],
            f"{files['own_cpu_seconds']:.1f}",
        ),
        (
            "DICOMweb sync from Orthanc (`sync_pacs`)",
            sync,
            sync["images_per_second"],
            sync["wall_seconds"],
            f"{sync['own_cpu_seconds']:.1f} (Orthanc {sync['orthanc_cpu_seconds']:.1f})",
        ),
        ("C-STORE, acknowledged", cstore, cstore["acknowledged_per_second"], cstore["acknowledged_seconds"], sender),
        (
            "C-STORE, indexed (`stop()` returned)",
            cstore,
            cstore["indexed_per_second"],
            cstore["indexed_seconds"],
            sender,
        ),
    ]
    lines = [
        f"![images/s per path](benchmarks/results/{PLOT})",
        "",
        f"The {results['images']} radiographs of `{results['archive']}` as 8-bit CR DICOM files (Explicit VR Little "
        f"Endian, {results['dicom_bytes'] / 2**20:.0f} MiB), indexed into a fresh index each time by the "
        f"{results['model']} in {results['runtime']}, one embedder for all, {results['workers']} workers, batches of "
        f"{results['batch']}; each path measured once after a warm-up run on {results['warm_up_images']} images. "
        "Orthanc (Debian's, with its DICOMweb plugin) runs on this machine and holds the same files; the C-STORE "
        "sender is a process of its own, one association, the files in its memory; the listener batches as "
        f"`cbmir listen` does ({cstore['listener_batch_size']} images or {cstore['listener_batch_seconds']:g} s). "
        "CPU s: this process with its index workers; Orthanc's and the sender's apart. *Other cores*: what the rest "
        f"of the machine kept busy (one-minute load average {results['load_average_before']:.2f} before the run).",
        "",
        "| path | images | seconds | images/s | seconds per stage (read, preprocess summed over workers) "
        "| CPU s | other cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row, rate, seconds, cpu in rows:
        lines.append(
            f"| {name} | {row['indexed']} | {seconds:.1f} | {rate:.1f} | {stages(row['stage_seconds'])} "
            f"| {cpu} | {row['other_cores']:.2f} |"
        )
    lines += [
        "",
        f"DICOMweb sync / files: **{results['ratio']:.2f}**, the target of {results['target']:.0%} is "
        + ("**met**." if met else "**not met**.")
        + f" The sync's *list* is the QIDO-RS search ({sync['stage_seconds']['list']:.2f} s); its *read* is the "
        "WADO-RS fetch and the decoding in the workers. Uploading the files to Orthanc (not timed above) took "
        f"{results['upload_seconds']:.0f} s.",
        "",
        where_the_time_goes(results),
    ]
    return "\n".join(lines)


def where_the_time_goes(results: dict) -> str:
    """Per image, the workers' read time and how busy they were, and the CPU each path took of the cores."""
    files, sync, workers, cores = results["files"], results["sync"], results["workers"], os.cpu_count() or 1

    def read_ms(row: dict) -> float:
        return row["stage_seconds"]["read"] / row["indexed"] * 1e3

    def workers_busy(row: dict) -> float:
        return (row["stage_seconds"]["read"] + row["stage_seconds"]["preprocess"]) / (workers * row["wall_seconds"])

    def cores_used(row: dict) -> float:
        return (row["own_cpu_seconds"] + row.get("orthanc_cpu_seconds", 0.0)) / row["wall_seconds"]

    return (
        f"Where the time goes: a worker's *read* took {read_ms(files):.1f} ms per image from a file and "
        f"{read_ms(sync):.1f} ms from Orthanc; the workers were busy {workers_busy(files):.0%} of the wall time "
        f"indexing files and {workers_busy(sync):.0%} syncing. Orthanc itself used "
        f"{sync['orthanc_cpu_seconds'] / sync['indexed'] * 1e3:.1f} ms of CPU per image. In all, indexing files kept "
        f"{cores_used(files):.2f} of the {cores} cores busy and syncing {cores_used(sync):.2f} (with Orthanc), "
        f"beside {files['other_cores']:.2f} and {sync['other_cores']:.2f} cores of other programs."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--archive",
        type=Path,
        default=ROOT.parents[1] / "shared" / "data" / "irma2007-dev",
        help="radiographs (8-bit grey) to convert to DICOM (default: the shared irma2007-dev)",
    )
    parser.add_argument(
        "--work", type=Path, default=ROOT.parent / "benchmark-work" / "pacs", help="DICOM files, Orthanc, scratch"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warm-up", type=int, default=32, help="images of each path's warm-up run")
    args = parser.parse_args()
    run_and_publish("pacs", run, args, plot=plot, plot_file=PLOT, markdown=markdown)


if __name__ == "__main__":
    main()
