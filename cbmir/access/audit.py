"""The audit trail: one record per API request (and per user change made with the `cbmir users` command),
appended to a table in the store: when, who, which route, which images were returned or changed, how many
results, from which address, with which status.

Invariants. Records are only appended: triggers refuse UPDATE and DELETE, so a mistake cannot change one.
Each record carries the SHA-256 of its own content and of the record before it (a hash chain), so an edit or
a removal made past the triggers (with another SQLite tool) is found by `AuditTrail.verify`: an edited
record no longer matches its hash; a removed one breaks the chain or leaves a gap in the sequence numbers,
which are taken from SQLite's AUTOINCREMENT counter and so never reused. Removing the newest records and
that counter's row together cannot be seen from inside the file: compare the head `verify` reports with
one noted earlier (`verify(head=...)`).

An append is one write transaction (BEGIN IMMEDIATE): appends from threads and processes are serialised,
and a record is complete or absent. When a record cannot be written, `append` raises `AuditWriteError`,
and the service then refuses the request it was for.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cbmir.errors import CbmirError
from cbmir.index.store import Store

GENESIS = "0" * 64  # the "previous hash" of the first record
_FIELDS = ("seq", "at", "user", "role", "route", "images", "count", "client", "status", "detail")
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        user TEXT NOT NULL,
        role TEXT NOT NULL,
        route TEXT NOT NULL,
        images TEXT NOT NULL,
        count INTEGER,
        client TEXT NOT NULL,
        status INTEGER NOT NULL,
        detail TEXT NOT NULL,
        previous TEXT NOT NULL,
        hash TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_user ON audit (user)",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
]
_BATCH = 10_000


class AuditWriteError(CbmirError):
    """An audit record that could not be written (the request it was for must fail)."""


@dataclass(frozen=True)
class Event:
    """What one audited action did. `user` and `role` are "-" for a caller who was not recognised; `route`
    is the method and route template (``GET /v1/images/{image_id}``) or the command; `images` the ids
    returned or changed; `count` the number of results, where the action has results; `status` the HTTP
    status, or 0 for a `cbmir` command that did what it was asked."""

    user: str
    role: str
    route: str
    client: str
    status: int
    images: Sequence[int] = ()
    count: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord(Event):
    seq: int = 0
    at: str = ""
    previous: str = GENESIS
    hash: str = ""


@dataclass(frozen=True)
class Verification:
    """The result of checking the chain: how many records, the newest (`head`: seq and hash), and what is
    wrong (empty when the trail is intact)."""

    records: int
    head: tuple[int, str] | None
    problems: list[str]

    @property
    def intact(self) -> bool:
        return not self.problems


def record_hash(previous: str, values: dict[str, Any]) -> str:
    """The hash of a record: of the previous record's hash and this record's fields, in a fixed form."""
    content = json.dumps([values[name] for name in _FIELDS], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{previous}\n{content}".encode()).hexdigest()


def _stored(event: Event, seq: int, at: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": at,
        "user": event.user,
        "role": event.role,
        "route": event.route,
        "images": json.dumps([int(i) for i in event.images]),
        "count": event.count,
        "client": event.client,
        "status": int(event.status),
        "detail": json.dumps(event.detail, sort_keys=True, default=str),
    }


def _record(row: sqlite3.Row | tuple[Any, ...]) -> AuditRecord:
    seq, at, user, role, route, images, count, client, status, detail, previous, digest = row
    return AuditRecord(
        user=user,
        role=role,
        route=route,
        client=client,
        status=status,
        images=tuple(json.loads(images)),
        count=count,
        detail=json.loads(detail),
        seq=seq,
        at=at,
        previous=previous,
        hash=digest,
    )


class AuditTrail:
    """The audit table of one store: append, show, verify. Safe to share between threads."""

    def __init__(self, store: Store):
        self._store = store
        store.add_tables(_SCHEMA)

    def append(self, event: Event) -> AuditRecord:
        """Write one record, chained to the newest; an `AuditWriteError` when it cannot be written."""
        try:
            with self._store.writing() as db:
                last = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                counter = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
                values = _stored(event, (counter[0] if counter else 0) + 1, datetime.now(UTC).isoformat())
                previous = last[0] if last else GENESIS
                digest = record_hash(previous, values)
                db.execute(
                    f"INSERT INTO audit ({', '.join(_FIELDS)}, previous, hash) "
                    f"VALUES ({', '.join(':' + name for name in _FIELDS)}, :previous, :hash)",
                    {**values, "previous": previous, "hash": digest},
                )
        except sqlite3.Error as error:
            raise AuditWriteError(f"the audit record could not be written to {self._store.path}: {error}") from None
        return _record((*values.values(), previous, digest))

    def records(
        self,
        *,
        user: str | None = None,
        image: int | None = None,
        since: str | None = None,
        until: str | None = None,
        last: int | None = None,
    ) -> list[AuditRecord]:
        """Records, oldest first, of one user, that returned or changed one image, from `since` (an ISO time
        or date, inclusive) until `until` (exclusive); only the newest `last` of them when given."""
        terms: list[str] = []
        params: list[str | int] = []
        if user is not None:
            terms.append("user = ?")
            params.append(user)
        if image is not None:
            terms.append("EXISTS (SELECT 1 FROM json_each(images) WHERE value = ?)")
            params.append(int(image))
        if since is not None:
            terms.append("at >= ?")
            params.append(since)
        if until is not None:
            terms.append("at < ?")
            params.append(until)
        query = f"SELECT {', '.join(_FIELDS)}, previous, hash FROM audit WHERE {' AND '.join(terms) or '1'}"
        query += " ORDER BY seq DESC" + (f" LIMIT {int(last)}" if last is not None else "")
        with self._store.reading() as db:
            rows = db.execute(query, params).fetchall()
        return [_record(row) for row in reversed(rows)]

    def _chain(self) -> Iterator[tuple[dict[str, Any], str, str]]:
        after = 0
        while True:
            with self._store.reading() as db:
                rows = db.execute(
                    f"SELECT {', '.join(_FIELDS)}, previous, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, _BATCH),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield dict(zip(_FIELDS, row[:-2], strict=True)), row[-2], row[-1]
            after = rows[-1][0]

    def verify(self, head: tuple[int, str] | None = None) -> Verification:
        """Check every record's hash and its link to the one before; with `head` (a seq and hash noted
        earlier), also that this record is still there unchanged."""
        problems: list[str] = []
        previous, expected, count, newest = GENESIS, 1, 0, None
        head_seen = False
        for values, linked, digest in self._chain():
            seq = values["seq"]
            count += 1
            if seq != expected:
                problems.append(f"records {expected} to {seq - 1} are missing (removed)")
            elif linked != previous:
                problems.append(f"record {seq} does not follow record {seq - 1} (one of them was replaced)")
            if record_hash(linked, values) != digest:
                problems.append(f"record {seq} was changed after it was written (its hash does not match)")
            if head is not None and seq == head[0]:
                head_seen = True
                if digest != head[1]:
                    problems.append(f"record {seq} is not the record noted earlier (its hash differs)")
            previous, expected, newest = digest, seq + 1, (seq, digest)
        with self._store.reading() as db:
            counter = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
        if counter is not None and counter[0] >= expected:
            problems.append(f"records {expected} to {counter[0]} are missing (removed at the end)")
        if head is not None and not head_seen:
            problems.append(f"record {head[0]}, noted earlier, is missing")
        return Verification(count, newest, problems)
