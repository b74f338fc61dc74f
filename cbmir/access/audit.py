"""The audit trail: one record per API request (and per user change made with the `cbmir users` command),
appended to a table in the store: when, who, which route, which images were returned or changed, how many
results, from which address, with which status.

Invariants, on SQLite and PostgreSQL alike. Records are only appended: triggers refuse UPDATE and DELETE
(and TRUNCATE in PostgreSQL), so a mistake cannot change one. Each record carries the SHA-256 of its own
content and of the record before it (a hash chain), so an edit or a removal made past the triggers (with
another database tool) is found by `AuditTrail.verify`: an edited record no longer matches its hash; a
removed one breaks the chain or leaves a gap in the sequence numbers, which follow the table's
AUTOINCREMENT counter (`Database.counter`) and so are never reused. Removing the newest records and that
counter's row together cannot be seen from inside the store: compare the head `verify` reports with one
noted earlier (`verify(head=...)`).

An append is one write transaction (`Database.transaction`: one writer at a time): appends from threads and
processes, also processes sharing a PostgreSQL store, are serialised, and a record is complete or absent.
When a record cannot be written, `append` raises `AuditWriteError`, and the service then refuses the
request it was for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cbmir.errors import CbmirError
from cbmir.index.errors import DatabaseError
from cbmir.index.store import Store

GENESIS = "0" * 64  # the "previous hash" of the first record
_FIELDS = ("seq", "at", "user", "role", "route", "images", "count", "client", "status", "detail")
_COLUMNS = ", ".join(f'"{name}"' for name in _FIELDS)  # quoted: "user" is a keyword in PostgreSQL
_SCHEMA = [  # column types in braces: see cbmir.index.database
    """CREATE TABLE IF NOT EXISTS audit (
        seq {id},
        at {text} NOT NULL,
        "user" {text} NOT NULL,
        role {text} NOT NULL,
        route {text} NOT NULL,
        images {text} NOT NULL,
        count INTEGER,
        client {text} NOT NULL,
        status INTEGER NOT NULL,
        detail {text} NOT NULL,
        previous {text} NOT NULL,
        hash {text} NOT NULL)""",
    'CREATE INDEX IF NOT EXISTS audit_user ON audit ("user")',
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
]
APPEND_ONLY = "the audit trail is append-only"
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


def _record(row: tuple[Any, ...]) -> AuditRecord:
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
        database = store.database
        store.add_tables(
            [
                *_SCHEMA,
                *database.counted("audit", "seq"),
                *database.refusing("audit", ("UPDATE", "DELETE"), APPEND_ONLY),
            ]
        )

    def append(self, event: Event) -> AuditRecord:
        """Write one record, chained to the newest; an `AuditWriteError` when it cannot be written."""
        try:
            with self._store.writing() as db:
                last = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                values = _stored(event, db.counter("audit") + 1, datetime.now(UTC).isoformat())
                previous = last[0] if last else GENESIS
                digest = record_hash(previous, values)
                db.execute(
                    f"INSERT INTO audit ({_COLUMNS}, previous, hash) VALUES ({', '.join('?' * (len(_FIELDS) + 2))})",
                    (*values.values(), previous, digest),
                )
        except DatabaseError as error:
            raise AuditWriteError(f"the audit record could not be written to {error}") from None
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
            terms.append('"user" = ?')
            params.append(user)
        if image is not None:
            terms.append(self._store.database.json_array_contains("images"))
            params.append(int(image))
        if since is not None:
            terms.append("at >= ?")
            params.append(since)
        if until is not None:
            terms.append("at < ?")
            params.append(until)
        query = f"SELECT {_COLUMNS}, previous, hash FROM audit WHERE {' AND '.join(terms) or 'TRUE'}"
        query += " ORDER BY seq DESC" + (f" LIMIT {int(last)}" if last is not None else "")
        with self._store.reading() as db:
            rows = db.execute(query, params).fetchall()
        return [_record(row) for row in reversed(rows)]

    def _chain(self) -> Iterator[tuple[dict[str, Any], str, str]]:
        after = 0
        while True:
            with self._store.reading() as db:
                rows = db.execute(
                    f"SELECT {_COLUMNS}, previous, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
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
            counter = db.counter("audit")
        if counter >= expected:
            problems.append(f"records {expected} to {counter} are missing (removed at the end)")
        if head is not None and not head_seen:
            problems.append(f"record {head[0]}, noted earlier, is missing")
        return Verification(count, newest, problems)
