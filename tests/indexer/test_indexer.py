"""The batch indexer end to end: a real (small, untrained) model checkpoint, real worker processes, a real
SQLite store and FAISS index, and a command-line run killed with SIGKILL."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cbmir.cli import app
from cbmir.datasets import open_dataset
from cbmir.embed import Embedder
from cbmir.imaging.io import ImageReadError, read_image
from cbmir.index import Engine, Filters
from cbmir.search import Retrieval
from cbmir.synthetic import write_synthetic_archive
from indexer.pipeline import index_records, read_archive
from tests.conftest import shared_path, small_checkpoint

CORRUPT = {"truncated": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "text": b"this is not an image\n", "empty": b""}


def archive_with_corrupt_files(folder: Path, source: Path) -> Path:
    """An IRMA-layout archive whose images link to `source`'s, plus one corrupt file of each kind."""
    images = folder / "images"
    images.mkdir(parents=True)
    lines = (source / "codes.csv").read_text().splitlines()
    for line in lines[1:]:
        image_id = line.split(";")[0]
        (images / f"{image_id}.png").symlink_to(source / "images" / f"{image_id}.png")
    for name, data in CORRUPT.items():
        (images / f"corrupt-{name}.png").write_bytes(data)
        lines.append(f"corrupt-{name};1121-127-700-500")
    (folder / "codes.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    source = write_synthetic_archive(tmp_path_factory.mktemp("phantoms"), per_kind=6, longest_side=80)
    archive = archive_with_corrupt_files(tmp_path_factory.mktemp("archive"), source)
    codes = [line.split(";")[1] for line in (source / "codes.csv").read_text().splitlines()[1:]]
    return archive, small_checkpoint(tmp_path_factory.mktemp("model"), codes)


def test_index_then_rerun_skips_everything_and_reports_failures(phantoms, tmp_path):
    archive, model = phantoms
    embedder = Embedder.load(model, batch_size=8)
    name, records = read_archive(archive)
    assert len(records) == 18 + 3
    with Retrieval.open(tmp_path, embedder) as retrieval:
        engine = retrieval.engine
        first = index_records(records, retrieval, dataset=name, batch_size=8, progress=False)
        assert (first.indexed, first.skipped, sum(first.failed.values())) == (18, 0, 3)
        assert first.seconds["model"] > 0 and first.seconds["read"] > 0
        again = index_records(records, retrieval, dataset=name, batch_size=8, progress=False)
        assert (again.indexed, again.skipped) == (0, 18)
        failures = {Path(row["location"]).name for row in engine.failures()}
        assert failures == {f"corrupt-{kind}.png" for kind in CORRUPT}
        assert engine.stats()["count"] == 18
        [hit] = engine.search_by_id(1, 1)
        assert hit.id == 1 and hit.score == pytest.approx(1.0, abs=1e-5)
        chest = engine.search(engine.embeddings([1])[0], 50, Filters(anatomy="5"))
        assert chest and all(hit.true_code is not None and hit.true_code.split("-")[2].startswith("5") for hit in chest)


def test_duplicate_content_in_one_run_is_indexed_once(phantoms, tmp_path):
    archive, model = phantoms
    folder = tmp_path / "twins"
    folder.mkdir()
    original = next((archive / "images").glob("synthetic-*.png"))
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(original.read_bytes())
    name, records = read_archive(folder)
    with Retrieval.open(tmp_path / "db", Embedder.load(model)) as retrieval:
        summary = index_records(records, retrieval, dataset=name, progress=False)
    assert (summary.indexed, summary.skipped) == (1, 1)


def test_cli_index_search_and_stats(phantoms, tmp_path):
    archive, model = phantoms
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(archive), "--model", str(model), "--db", str(tmp_path / "db")])
    assert result.exit_code == 0, result.output
    assert "indexed 18" in result.output and "failed 3" in result.output
    query = next((archive / "images").glob("synthetic-hand-*.png"))
    result = runner.invoke(
        app, ["search", str(query), "--db", str(tmp_path / "db"), "--model", str(model), "-k", "3", "--anatomy", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "predicted:" in result.output and "3 similar radiograph(s)" in result.output
    hits = [line for line in result.output.splitlines() if "  id " in line]
    assert len(hits) == 3 and all("1121-110-411-700" in line for line in hits)  # the hand phantoms' code
    result = runner.invoke(app, ["db", "stats", "--db", str(tmp_path / "db")])
    assert result.exit_code == 0 and '"count": 18' in result.output
    result = runner.invoke(app, ["db", "stats", "--db", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "holds no cbmir index" in result.output
    assert not (tmp_path / "nothing").exists()


def test_index_refuses_another_model(phantoms, tmp_path):
    archive, model = phantoms
    runner = CliRunner()
    runner.invoke(app, ["index", str(archive), "--model", str(model), "--db", str(tmp_path / "db")])
    other = small_checkpoint(tmp_path / "other", ["1121-127-700-500", "1123-110-500-000"])
    result = runner.invoke(app, ["index", str(archive), "--model", str(other), "--db", str(tmp_path / "db")])
    assert result.exit_code == 2 and "was built with model" in result.output


@pytest.mark.slow
def test_killed_runs_end_with_every_irma_image_exactly_once(tmp_path):
    """The issue's crash check: index irma2007-dev plus corrupt files, SIGKILL the indexer at random moments
    several times, run it again: 650 images exactly once, the corrupt files reported, FAISS == store."""
    source = shared_path("irma2007-dev")
    archive = archive_with_corrupt_files(tmp_path / "archive", source)
    codes = sorted({line.split(";")[1] for line in (source / "codes.csv").read_text().splitlines()[1:]})
    model = small_checkpoint(tmp_path / "model", codes)
    db = tmp_path / "db"
    command = [
        sys.executable,
        "-m",
        "cbmir",
        "index",
        str(archive),
        "--model",
        str(model),
        "--db",
        str(db),
        "--batch-size",
        "16",
    ]
    rng = random.Random(7)
    for _ in range(3):
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(rng.uniform(3.0, 7.0))
        os.killpg(process.pid, signal.SIGKILL)  # the workers die too
        process.wait()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    with Engine.open(db) as engine:
        stats = engine.stats()
        assert stats["count"] == 650
        rows = engine.get(engine.query())
        assert len({row.content_hash for row in rows}) == 650
        assert {Path(row["location"]).name for row in engine.failures()} == {f"corrupt-{k}.png" for k in CORRUPT}
        probe = rng.sample([row.id for row in rows], 5)
        for image_id in probe:
            [hit] = engine.search_by_id(image_id, 1)
            assert hit.id == image_id
    dataset = open_dataset(archive)
    assert len(dataset.records) == 653


def test_a_thin_strip_image_is_a_recorded_failure_and_the_run_goes_on(phantoms, tmp_path):
    """Issue 12, defects 1 and 3: a valid thin strip among good radiographs stopped the whole run or took
    gigabytes (its padded square); it is refused before anything is allocated, by name, and the rest is
    indexed."""
    archive, model = phantoms
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted((archive / "images").glob("synthetic-*.png"))[:6]:
        (folder / path.name).write_bytes(path.read_bytes())
    assert cv2.imwrite(str(folder / "strip.png"), np.full((1, 30_000), 128, np.uint8))
    result = CliRunner().invoke(app, ["index", str(folder), "--model", str(model), "--db", str(tmp_path / "db")])
    assert result.exit_code == 0, result.output
    assert "indexed 6, skipped 0 (already indexed), failed 1" in result.output
    with Engine.open(tmp_path / "db") as engine:
        [failure] = engine.failures()
    assert failure["location"].endswith("strip.png")
    assert "strip.png: a 30000 x 1 image cannot be padded to a square" in failure["reason"]


@pytest.mark.timeout(60)
def test_a_named_pipe_in_an_archive_is_neither_listed_nor_waited_on(phantoms, tmp_path):
    """Issue 12, defect 9: a named pipe in an archive folder hung the indexer for ever."""
    archive, model = phantoms
    folder = tmp_path / "with-pipe"
    folder.mkdir()
    for path in sorted((archive / "images").glob("synthetic-*.png"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "data")  # no image suffix: DICOM detection would open it to look for the magic
    with pytest.raises(ImageReadError, match="pipe.png: not a regular file"):
        read_image(folder / "pipe.png")
    result = CliRunner().invoke(app, ["index", str(folder), "--model", str(model), "--db", str(tmp_path / "db")])
    assert result.exit_code == 0, result.output
    assert "indexed 3, skipped 0 (already indexed), failed 0" in result.output


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped has ended)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_indexers_workers_exit_and_the_rerun_resumes(tmp_path):
    """Issue 12, defect 2: after a SIGKILL of the indexer alone, its workers lived on for minutes holding the
    index lock, and the re-run refused with "already open"."""
    archive = write_synthetic_archive(tmp_path / "archive", per_kind=60, longest_side=200)
    codes = [line.split(";")[1] for line in (archive / "codes.csv").read_text().splitlines()[1:]]
    model = small_checkpoint(tmp_path / "model", codes)
    command = [
        sys.executable,
        "-m",
        "cbmir",
        "index",
        str(archive),
        "--model",
        str(model),
        "--db",
        str(tmp_path / "db"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(workers := children_of(process.pid)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "the indexer ended before it was killed"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # the indexer alone, as a crash or the OOM killer would
    process.wait()
    deadline = time.monotonic() + 10
    while any(running(worker) for worker in workers):
        assert time.monotonic() < deadline, "the workers outlived their indexer"
        time.sleep(0.1)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    with Engine.open(tmp_path / "db") as engine:
        rows = engine.get(engine.query())
    assert len(rows) == len({row.content_hash for row in rows}) == 180
