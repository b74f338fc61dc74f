"""The audit trail on a real store, SQLite and PostgreSQL: append-only, hash-chained, and every kind of
tampering done past the triggers (with a connection of its own, as an attacker would) is found by `verify`."""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path

import psycopg
import pytest

from cbmir.access import AuditTrail, AuditWriteError, Event
from cbmir.access.audit import GENESIS, record_hash
from cbmir.index.store import Store
from tests.postgres import PASSWORD


@pytest.fixture
def trail(store_location):
    store = Store(store_location)
    trail = AuditTrail(store)
    for number in range(6):
        trail.append(
            Event(user=f"user{number % 2}", role="reader", route="GET /v1/images/{image_id}", client="127.0.0.1",
                  status=200, images=[number, 100 + number], count=number, detail={"k": number})
        )  # fmt: skip
    yield trail
    store.close()


def run_as_attacker(trail: AuditTrail, *statements: str) -> None:
    """Run statements on a connection of their own, past cbmir (the counter table has the backend's name)."""
    location = trail._store.name
    if trail._store.database.kind == "sqlite":
        with sqlite3.connect(Path(location)) as db:
            for statement in statements:
                db.execute(statement)
        return
    with psycopg.connect(location.replace("//cbmir@", f"//cbmir:{PASSWORD}@"), autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement.replace("sqlite_sequence", "cbmir_sequence"))


def tamper(trail: AuditTrail, *statements: str) -> None:
    """Change the store as someone with write access to it could: drop the triggers, edit, leave."""
    on = "" if trail._store.database.kind == "sqlite" else " ON audit"
    run_as_attacker(trail, f"DROP TRIGGER audit_no_update{on}", f"DROP TRIGGER audit_no_delete{on}", *statements)


def test_an_untouched_trail_verifies_and_chains_from_genesis(trail):
    result = trail.verify()
    assert result.intact and result.records == 6
    records = trail.records()
    assert [record.seq for record in records] == [1, 2, 3, 4, 5, 6]
    assert records[0].previous == GENESIS
    assert all(later.previous == earlier.hash for earlier, later in zip(records, records[1:], strict=False))
    assert result.head == (6, records[-1].hash)
    assert trail.verify(head=(3, records[2].hash)).intact


def test_the_triggers_refuse_edits_and_deletions(trail):
    statements = ["""UPDATE audit SET "user" = 'nobody'""", "DELETE FROM audit WHERE seq = 2"]
    if trail._store.database.kind == "postgresql":
        statements.append("TRUNCATE audit")
    for statement in statements:
        with pytest.raises((sqlite3.Error, psycopg.Error), match="append-only"):
            run_as_attacker(trail, statement)
    assert trail.verify().intact and trail.verify().records == 6


@pytest.mark.parametrize(
    ("statements", "found"),
    [
        (["""UPDATE audit SET "user" = 'nobody' WHERE seq = 3"""], "record 3 was changed"),
        (["UPDATE audit SET images = '[]' WHERE seq = 2"], "record 2 was changed"),
        (["UPDATE audit SET status = 404 WHERE seq = 6"], "record 6 was changed"),
        (["DELETE FROM audit WHERE seq = 4"], "records 4 to 4 are missing"),
        (["DELETE FROM audit WHERE seq >= 5"], "records 5 to 6 are missing (removed at the end)"),
        (["DELETE FROM audit"], "records 1 to 6 are missing (removed at the end)"),
        # renumbering after a removal: the chain breaks where the removed record was
        (["DELETE FROM audit WHERE seq = 4", "UPDATE audit SET seq = seq - 1 WHERE seq > 4"], "does not follow"),
    ],
)
def test_verify_finds_every_kind_of_tampering(trail, statements, found):
    tamper(trail, *statements)
    result = trail.verify()
    assert not result.intact
    assert any(found in problem for problem in result.problems), result.problems


def test_a_rewritten_tail_is_caught_by_the_head_noted_before(trail):
    """Removing the newest records and the AUTOINCREMENT counter together leaves a consistent file: only a
    head noted earlier shows it."""
    head = trail.verify().head
    tamper(trail, "DELETE FROM audit WHERE seq >= 5", "UPDATE sqlite_sequence SET seq = 4 WHERE name = 'audit'")
    assert trail.verify().intact
    result = trail.verify(head=head)
    assert not result.intact and "record 6, noted earlier, is missing" in result.problems


def test_a_recomputed_hash_is_caught_by_the_link_of_the_next_record(trail):
    records = trail.records()
    forged = {name: getattr(records[2], name) for name in ("seq", "at", "role", "route", "count", "client")}
    forged.update(user="nobody", images="[2, 102]", status=200, detail='{"k": 2}')
    digest = record_hash(records[2].previous, forged)
    tamper(trail, f"""UPDATE audit SET "user" = 'nobody', hash = '{digest}' WHERE seq = 3""")
    result = trail.verify()
    assert result.problems == ["record 4 does not follow record 3 (one of them was replaced)"]


def test_filters(trail):
    assert [record.seq for record in trail.records(user="user1")] == [2, 4, 6]
    assert [record.seq for record in trail.records(image=103)] == [4]
    assert [record.seq for record in trail.records(last=2)] == [5, 6]
    assert trail.records(since="2999-01-01") == [] and len(trail.records(until="2999-01-01")) == 6


def test_concurrent_appends_keep_one_chain(trail, store_location):
    def append(number: int) -> None:
        store = Store(store_location) if number % 2 else None  # half with connections of their own, as processes
        appending = AuditTrail(store) if store else trail
        for _ in range(25):
            appending.append(Event(user=f"t{number}", role="admin", route="DELETE /v1/images/{image_id}",
                                   client="::1", status=200, images=[number]))  # fmt: skip
        if store:
            store.close()

    threads = [threading.Thread(target=append, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = trail.verify()
    assert result.intact and result.records == 106


def test_a_record_that_cannot_be_written_is_an_error_naming_the_store(trail):
    if trail._store.database.kind == "sqlite":
        run_as_attacker(
            trail, "CREATE TRIGGER refuse BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    else:
        run_as_attacker(
            trail,
            "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE 'disk full'; END $$",
            "CREATE TRIGGER refuse BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION disk_full()",
        )
    with pytest.raises(AuditWriteError, match=rf"{re.escape(trail._store.name)}: disk full"):
        trail.append(Event(user="ada", role="reader", route="GET /v1/stats", client="::1", status=200))
    assert trail.verify().intact and trail.verify().records == 6  # nothing half-written
