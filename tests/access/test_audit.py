"""The audit trail on a real SQLite store: append-only, hash-chained, and every kind of tampering done
past the triggers (with another SQLite connection, as an attacker would) is found by `verify`."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from cbmir.access import AuditTrail, AuditWriteError, Event
from cbmir.access.audit import GENESIS, record_hash
from cbmir.index.store import Store


@pytest.fixture
def trail(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    trail = AuditTrail(store)
    for number in range(6):
        trail.append(
            Event(user=f"user{number % 2}", role="reader", route="GET /v1/images/{image_id}", client="127.0.0.1",
                  status=200, images=[number, 100 + number], count=number, detail={"k": number})
        )  # fmt: skip
    yield trail
    store.close()


def tamper(trail: AuditTrail, *statements: str) -> None:
    """Change the file as someone with write access to it could: drop the triggers, edit, leave."""
    with sqlite3.connect(trail._store.path) as db:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("DROP TRIGGER audit_no_delete")
        for statement in statements:
            db.execute(statement)


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
    with sqlite3.connect(trail._store.path) as db:
        for statement in ["UPDATE audit SET user = 'nobody'", "DELETE FROM audit WHERE seq = 2"]:
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)


@pytest.mark.parametrize(
    ("statements", "found"),
    [
        (["UPDATE audit SET user = 'nobody' WHERE seq = 3"], "record 3 was changed"),
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
    tamper(trail, f"UPDATE audit SET user = 'nobody', hash = '{digest}' WHERE seq = 3")
    result = trail.verify()
    assert result.problems == ["record 4 does not follow record 3 (one of them was replaced)"]


def test_filters(trail):
    assert [record.seq for record in trail.records(user="user1")] == [2, 4, 6]
    assert [record.seq for record in trail.records(image=103)] == [4]
    assert [record.seq for record in trail.records(last=2)] == [5, 6]
    assert trail.records(since="2999-01-01") == [] and len(trail.records(until="2999-01-01")) == 6


def test_concurrent_appends_keep_one_chain(trail):
    def append(number: int) -> None:
        for _ in range(25):
            trail.append(Event(user=f"t{number}", role="admin", route="DELETE /v1/images/{image_id}",
                               client="::1", status=200, images=[number]))  # fmt: skip

    threads = [threading.Thread(target=append, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = trail.verify()
    assert result.intact and result.records == 106


def test_a_record_that_cannot_be_written_is_an_error_naming_the_store(trail):
    with sqlite3.connect(trail._store.path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(AuditWriteError, match=r"store\.sqlite: disk full"):
        trail.append(Event(user="ada", role="reader", route="GET /v1/stats", client="::1", status=200))
    assert trail.verify().intact and trail.verify().records == 6  # nothing half-written
