"""An index whose store is a real PostgreSQL server (tests/postgres.py), shared by processes: the engine on
it, credentials and unreachable servers, other processes' adds and removals, racing writers, a writer killed
mid-transaction, and `cbmir index --db postgresql://...` end to end. The store's own behaviour on both
backends is tests/index/test_store.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from typer.testing import CliRunner

from cbmir.cli import app as cli
from cbmir.embed import Embedder
from cbmir.index import Engine, Filters, IndexConfigError
from cbmir.index.errors import DatabaseError
from cbmir.index.store import Store
from cbmir.locations import Location
from cbmir.search import Retrieval
from cbmir.synthetic import write_synthetic_archive
from indexer.pipeline import Mapped, Summary, write_batch
from tests.conftest import small_checkpoint
from tests.index import CODES, FILTERS, STAMP, assert_exact, index_ids, make_entries, passes, unit_vectors
from tests.postgres import PASSWORD, free_port

REPO = Path(__file__).resolve().parents[2]
DIMENSION = STAMP.dimension


def shared(url: str, folder: Path, **options) -> Engine:
    """One process's engine on the shared store: its own vector folder, refreshed before every search
    unless `options` say otherwise."""
    return Engine.open(url, vectors=folder, model=STAMP, **{"refresh_seconds": 0, **options})


def in_another_process(code: str, *, wait: bool = True) -> subprocess.Popen:
    """Run Python `code` (dedented) in a process of its own, from the repository (for `tests.index`)."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
    return process


def test_an_engine_on_postgresql_searches_exactly_and_keeps_its_vectors_in_its_folder(postgres_url, tmp_path):
    entries = make_entries(unit_vectors(500, DIMENSION, seed=31), seed=31)
    with shared(postgres_url, tmp_path / "vectors") as engine:
        ids = engine.add(entries)
        engine.remove(ids[:50].tolist())
    by_id = dict(zip(ids[50:].tolist(), entries[50:], strict=True))
    vectors = {i: entry.embedding for i, entry in by_id.items()}
    with shared(postgres_url, tmp_path / "vectors") as engine:  # reopened from its files
        assert engine.stats()["store"] == postgres_url.replace(f":{PASSWORD}", "")
        for filters in (None, *FILTERS[:6]):
            allowed = {i: vector for i, vector in vectors.items() if passes(by_id[i], filters)}
            for query in unit_vectors(2, DIMENSION, seed=32):
                assert_exact(engine.search(query, 10, filters), query, allowed, 10)
    assert sorted(path.name for path in (tmp_path / "vectors").iterdir()) == [".lock", "vectors.faiss", "vectors.json"]


def test_a_connection_the_server_cut_fails_one_statement_then_is_made_again(postgres_url, postgres_server, tmp_path):
    """A server restart or an administrator ending sessions: the statement that meets the cut connection is a
    `DatabaseError` naming the store; the next one reconnects, and nothing committed is lost."""
    entries = make_entries(unit_vectors(20, DIMENSION, seed=33), seed=33)
    with shared(postgres_url, tmp_path / "vectors") as engine:
        ids = engine.add(entries[:10])
        database = postgres_url.rsplit("/", 1)[1]
        postgres_server.admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' AND pid <> "
            "pg_backend_pid()"
        )
        with pytest.raises(DatabaseError, match=f"127.0.0.1 port {postgres_server.port}|{database}") as cut:
            engine.add(entries[10:])
        assert PASSWORD not in str(cut.value)
        ids = np.concatenate([ids, engine.add(entries[10:])])  # reconnected: the batch that failed is stored whole
        assert sorted(row.id for row in engine.get(engine.query())) == sorted(ids.tolist())
        assert len(ids) == 20


def test_a_wrong_password_is_a_clear_error_that_never_shows_it(postgres_server):
    wrong = "not-the-Password-0815"
    url = postgres_server.url("postgres", password=wrong)
    with pytest.raises(IndexConfigError) as raised:
        Store(url)
    message = str(raised.value)
    assert f"'postgres' at 127.0.0.1 port {postgres_server.port} as cbmir" in message
    assert "password authentication failed" in message and wrong not in message
    result = CliRunner().invoke(cli, ["db", "stats", "--db", url])
    assert result.exit_code == 2 and "password authentication failed" in result.output
    assert wrong not in result.output and "Traceback" not in result.output


def test_the_password_may_come_from_pgpassword(postgres_url, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    store = Store(postgres_url.replace(f":{PASSWORD}@", "@"))
    assert store.meta("schema_version") == 1
    store.close()


def test_an_unreachable_database_is_a_fast_clear_error(tmp_path):
    port = free_port()  # nobody listens there
    url = f"postgresql://cbmir:{PASSWORD}@127.0.0.1:{port}/archive"
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["db", "stats", "--db", url])
    assert time.monotonic() - started < 5
    assert result.exit_code == 2 and "Traceback" not in result.output and PASSWORD not in result.output
    assert f"cannot connect to the PostgreSQL database 'archive' at 127.0.0.1 port {port}" in result.output
    assert "refused" in result.output


def test_a_database_without_an_index_is_not_made_one_by_a_read_command(postgres_url):
    result = CliRunner().invoke(cli, ["db", "failures", "--db", postgres_url])
    assert result.exit_code == 2 and "holds no cbmir index" in result.output and PASSWORD not in result.output


def test_processes_sharing_a_store_see_each_others_adds_and_removals(postgres_url, tmp_path):
    mine = make_entries(unit_vectors(200, DIMENSION, seed=41), seed=41)
    with shared(postgres_url, tmp_path / "mine") as engine:
        ids = engine.add(mine)
        in_another_process(f"""
            from cbmir.index import Engine
            from tests.index import STAMP, make_entries, unit_vectors
            with Engine.open({postgres_url!r}, vectors={str(tmp_path / "theirs")!r}, model=STAMP) as engine:
                engine.add(make_entries(unit_vectors(50, {DIMENSION}, seed=42), seed=42, prefix="theirs"))
                engine.remove(list(range(1, 11)))
        """)
        theirs = make_entries(unit_vectors(50, DIMENSION, seed=42), seed=42, prefix="theirs")
        [hit] = engine.search(theirs[7].embedding, 1)  # the search takes their changes in first
        assert hit.location == theirs[7].location and hit.score == pytest.approx(1.0, abs=1e-5)
        assert not {hit.id for hit in engine.search(mine[3].embedding, 20)} & set(range(1, 11))
        assert index_ids(engine) == set(engine.query().tolist()) and len(index_ids(engine)) == 240
        assert set(engine.query(Filters(dataset="irma")).tolist()) <= index_ids(engine)
        more = engine.add(make_entries(unit_vectors(5, DIMENSION, seed=43), seed=43, prefix="more"))
        assert more.min() > ids.max() + 50  # ids never reused, whoever added


def test_a_hit_removed_by_another_process_since_the_last_refresh_is_never_returned(postgres_url, tmp_path):
    entries = make_entries(unit_vectors(100, DIMENSION, seed=51), seed=51)
    with (
        shared(postgres_url, tmp_path / "a", refresh_seconds=3600) as lazy,
        shared(postgres_url, tmp_path / "b") as other,
    ):
        ids = lazy.add(entries)
        other.refresh()
        other.remove([int(ids[5])])
        hits = lazy.search(entries[5].embedding, 10)  # its vectors still hold it: found missing, refreshed
        assert int(ids[5]) not in {hit.id for hit in hits} and len(hits) == 10


def test_an_image_another_indexer_stored_meanwhile_is_skipped_not_doubled(postgres_url, tmp_path):
    embedder = Embedder.load(small_checkpoint(tmp_path / "model", list(CODES)))
    entries = make_entries(unit_vectors(10, embedder.stamp.dimension, seed=61), seed=61)
    with (
        Retrieval.open(postgres_url, embedder, vectors=tmp_path / "first") as first,
        Retrieval.open(postgres_url, embedder, vectors=tmp_path / "second") as second,
    ):
        first.engine.add(entries[2:8])  # won the race after the second checked what is indexed
        batch = [Mapped(Location(Path(entry.location)), entry.content_hash, entry=entry) for entry in entries]
        summary = Summary()
        write_batch(batch, second, summary)
        assert (summary.indexed, summary.skipped) == (4, 6)
        assert sorted(row.location for row in second.engine.get(second.engine.query())) == sorted(
            entry.location for entry in entries
        )


def test_a_writer_killed_inside_its_transaction_leaves_nothing(postgres_url, tmp_path):
    writer = in_another_process(
        f"""
        import numpy as np
        from cbmir.index.store import Store
        from tests.index import make_entries, unit_vectors
        entries = make_entries(unit_vectors(4000, 512, seed=71), seed=71)
        store = Store({postgres_url!r})
        print("adding", flush=True)
        store.add(entries, np.stack([entry.embedding for entry in entries]))
        """,
        wait=False,
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "adding"
    with psycopg.connect(postgres_url, autocommit=True) as watcher:
        deadline = time.monotonic() + 30
        while not watcher.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline and writer.poll() is None, "the writer never began its transaction"
            time.sleep(0.005)
        os.kill(writer.pid, signal.SIGKILL)  # holding the writer lock: inside the add's transaction
        writer.wait()
        while watcher.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]:  # type: ignore[index]
            time.sleep(0.01)  # the server notices the closed connection and rolls back
    store = Store(postgres_url)
    with store.reading() as db:
        assert db.execute("SELECT count(*) FROM image_labels").fetchone()[0] == 0
    assert store.count() == 0 and store.meta("dimension") is None
    entries = make_entries(unit_vectors(3, 512, seed=72), seed=72)
    assert len(store.add(entries, np.stack([entry.embedding for entry in entries]))) == 3  # nothing left locked
    store.close()


def test_cbmir_index_into_postgresql_with_two_indexers_racing_stores_every_image_once(postgres_url, tmp_path):
    archive = write_synthetic_archive(tmp_path / "archive", per_kind=3, longest_side=96)
    codes = [line.split(";")[1] for line in (archive / "codes.csv").read_text().splitlines()[1:]]
    model = small_checkpoint(tmp_path / "model", codes)
    command = [sys.executable, "-m", "cbmir", "index", str(archive), "--model", str(model), "--db", postgres_url]
    indexers = [
        subprocess.Popen(
            [*command, "--vectors", str(tmp_path / f"vectors{n}"), "--workers", "1", "--batch-size", "3"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(2)
    ]
    outputs = [indexer.communicate(timeout=180)[0] for indexer in indexers]
    for indexer, output in zip(indexers, outputs, strict=True):
        assert indexer.returncode == 0, output
        assert PASSWORD not in output
    indexed = [int(output.split("indexed ")[1].split(",")[0]) for output in outputs]
    assert sum(indexed) == 9  # each image by one of them; the other skipped it
    stats = CliRunner().invoke(cli, ["db", "stats", "--db", postgres_url, "--vectors", str(tmp_path / "vectors0")])
    assert stats.exit_code == 0, stats.output
    assert '"count": 9' in stats.output and PASSWORD not in stats.output
