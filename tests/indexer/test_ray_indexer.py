"""The indexer on Ray Data against a real multi-node Ray cluster on this machine: Ray's own `Cluster` (a head
and two worker nodes, one CPU and a small object store each, real processes), a real (small, untrained)
model checkpoint, a real SQLite store and FAISS index. One cluster serves the whole module."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

from cbmir.cli import app
from cbmir.embed import Embedder
from cbmir.index import Engine
from cbmir.search import Retrieval
from cbmir.synthetic import write_synthetic_archive
from indexer.pipeline import index_records, read_archive
from indexer.ray_pipeline import CONNECT_SECONDS, RayIndexingError, check_address, index_on_ray
from tests.conftest import small_checkpoint

OBJECT_STORE = 200 * 2**20
BATCH = 8


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": OBJECT_STORE},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def codes_of(archive: Path) -> list[str]:
    return [line.split(";")[1] for line in (archive / "codes.csv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """An archive of 24 drawn radiographs and one file that is not an image, and a model for its codes."""
    archive = write_synthetic_archive(tmp_path_factory.mktemp("phantoms"), per_kind=8, longest_side=80)
    (archive / "images" / "broken.png").write_bytes(b"this is not an image\n")
    with (archive / "codes.csv").open("a") as table:
        table.write("broken;1121-127-700-500\n")
    return archive, small_checkpoint(tmp_path_factory.mktemp("model"), codes_of(archive))


@pytest.fixture(scope="module")
def indexed(cluster, phantoms, tmp_path_factory):
    """The archive indexed by `cbmir index --ray ADDRESS` into a fresh index: the CLI end to end."""
    archive, model = phantoms
    db = tmp_path_factory.mktemp("ray-db")
    command = ["index", str(archive), "--ray", cluster.address, "--model", str(model), "--db", str(db)]
    result = CliRunner().invoke(app, [*command, "--batch-size", str(BATCH)])
    return db, result


def test_the_cli_indexes_on_the_cluster_and_reports_the_failure(indexed):
    db, result = indexed
    assert result.exit_code == 0, result.output
    # Usage statistics off: no thread left behind polling a Prometheus server (Ray Data's usage collector).
    assert "data-usage-metrics-poller" not in {thread.name for thread in threading.enumerate()}
    assert "indexed 24, skipped 0 (already indexed), failed 1" in result.output
    assert "seconds per stage" in result.output and "failure report: cbmir db failures" in result.output
    failures = CliRunner().invoke(app, ["db", "failures", "--db", str(db)])
    assert failures.exit_code == 0 and "broken.png" in failures.output


def test_vectors_equal_the_single_machine_indexers(indexed, phantoms, tmp_path):
    db, result = indexed
    assert result.exit_code == 0, result.output
    archive, model = phantoms
    name, records = read_archive(archive)
    with Retrieval.open(tmp_path / "local", Embedder.load(model, batch_size=BATCH)) as local:
        index_records(records, local, dataset=name, batch_size=BATCH, progress=False)
        expected = stored(local.engine)
    with Engine.open(db) as engine:
        found = stored(engine)
        [failure] = engine.failures()
    assert found.keys() == expected.keys() and len(found) == 24
    for content_hash, (location, code, vector) in expected.items():
        assert found[content_hash][:2] == (location, code)
        assert np.allclose(found[content_hash][2], vector, atol=1e-5), location
    assert failure["location"].endswith("broken.png") and "broken.png" in failure["reason"]


def stored(engine: Engine) -> dict[str, tuple[str, str | None, np.ndarray]]:
    """Each indexed image by content hash: its location, predicted code and vector."""
    ids = engine.query()
    rows, vectors = engine.get(ids), engine.embeddings(ids)
    return {row.content_hash: (row.location, row.predicted, vector) for row, vector in zip(rows, vectors, strict=True)}


def test_a_rerun_adds_nothing(indexed, cluster, phantoms):
    db, result = indexed
    assert result.exit_code == 0, result.output
    archive, model = phantoms
    name, records = read_archive(archive)
    with Retrieval.open(db, Embedder.load(model, batch_size=BATCH)) as retrieval:
        again = index_on_ray(
            records, retrieval, model=model, dataset=name, address=cluster.address, batch_size=BATCH, progress=False
        )
        assert (again.indexed, again.skipped, sum(again.failed.values())) == (0, 24, 1)
        assert retrieval.engine.stats()["count"] == 24
        assert "MapBatches(map_records)" in again.ray_stats and "MapBatches(EmbedActor)" in again.ray_stats


@pytest.mark.slow
def test_a_worker_node_dying_mid_run_loses_and_doubles_nothing(cluster, tmp_path):
    """A worker node is removed (its raylet, object store and workers killed) while the run writes; the run
    finishes (Ray retries its tasks and restarts its actor) or stops with a clear error, and a re-run ends
    with every image exactly once."""
    archive = write_synthetic_archive(tmp_path / "archive", per_kind=40, longest_side=120)
    model = small_checkpoint(tmp_path / "model", codes_of(archive))
    name, records = read_archive(archive)
    embedder = Embedder.load(model, batch_size=4)
    victim = next(iter(cluster.worker_nodes))
    removed: dict[str, int] = {}

    def remove_after_first_batches(engine: Engine) -> None:
        deadline = time.monotonic() + 120
        while len(engine.query()) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        removed["stored_before"] = len(engine.query())
        cluster.remove_node(victim)
        removed["stored_after"] = len(engine.query())

    with Retrieval.open(tmp_path / "db", embedder) as retrieval:
        killer = threading.Thread(target=remove_after_first_batches, args=(retrieval.engine,))
        killer.start()
        try:
            first = index_on_ray(
                records, retrieval, model=model, dataset=name, address=cluster.address, batch_size=4, progress=False
            )
            finished = first.indexed
        except RayIndexingError as error:
            assert "run it again" in str(error)
            finished = None
        finally:
            killer.join()
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)  # the next tests' cluster
            cluster.wait_for_nodes()
        assert removed["stored_before"] < 120, "the run ended before the node was removed: nothing was tested"
        again = index_on_ray(
            records, retrieval, model=model, dataset=name, address=cluster.address, batch_size=4, progress=False
        )
        rows = retrieval.engine.get(retrieval.engine.query())
    assert len(rows) == len({row.content_hash for row in rows}) == 120
    assert again.indexed + again.skipped == 120 and not again.failed
    if finished is not None:
        assert finished == 120 and again.indexed == 0


def test_the_read_tasks_never_load_torch():
    """A Ray worker that only reads and preprocesses imports `indexer.ray_pipeline` (for `map_records`), and
    with it `indexer.pipeline`: torch would cost each such worker seconds and hundreds of MB for nothing."""
    code = "import sys, indexer.ray_pipeline; print(sorted({'torch', 'cbmir.embed'} & set(sys.modules)))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_where_nothing_listens_is_refused_at_once_by_the_cli(phantoms, tmp_path):
    archive, model = phantoms
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    command = ["index", str(archive), "--ray", address, "--model", str(model), "--db", str(tmp_path / "db")]
    result = CliRunner().invoke(app, command)
    assert time.monotonic() - started < 30
    assert result.exit_code == 2, result.output
    assert f"error: no Ray cluster answers at {address}" in result.output
    assert "Traceback" not in result.output


def test_an_address_that_answers_but_not_as_ray_is_refused_within_the_limit():
    """A server there that is not Ray's (here: one that answers HTTP/1.1) would keep `ray.init` retrying for
    minutes; it is refused within `CONNECT_SECONDS`."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"

        def answer() -> None:
            connection, _ = server.accept()
            with connection:
                connection.recv(64)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(RayIndexingError, match=f"{address} answers, but not as a Ray cluster"):
            check_address(address)
    assert time.monotonic() - started < CONNECT_SECONDS + 1
