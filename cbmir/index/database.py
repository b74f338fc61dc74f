"""Where a store's rows live, and the one connection API the store and the modules that keep tables in it
(`cbmir.access`) use: a SQLite file, or a PostgreSQL database named by a ``postgresql://`` URL.

Statements are written once, with ``?`` placeholders, and run on either backend. What differs between the
two is kept here, small and named: the column types of ``CREATE`` statements (`Database.ddl`: ``{id}``,
``{blob}``, ``{real}``, ``{text}``, ``{text_nocase}``, ``{covering}``, ``{table_options}``,
``{without_rowid}``), a prefix match that an index answers (`prefix_match`), a list parameter (`in_list`), a
case-blind label match, a JSON array test, triggers that refuse changes, and the counter of the highest id a
table ever held (`counter`).

Invariants, on both backends:

- One writer at a time: `transaction` is SQLite's ``BEGIN IMMEDIATE`` or, in PostgreSQL, a transaction that
  first takes one advisory lock of the database. So a check made inside a write transaction (a content hash
  not stored yet, the newest audit record) still holds at its commit, and ids are committed in the order
  they were handed out: a reader that sees id n will never later see a new id below n.
- A transaction is all or nothing, also when the process is killed in the middle of it.
- Text compares and sorts by bytes (SQLite's BINARY; PostgreSQL columns use the "C" collation), so
  filters, orderings and uniqueness mean the same on both.
- Every failure of the database is a `DatabaseError` naming the store; a PostgreSQL password is never part
  of a message (`PostgresAddress.name` leaves it out).
"""

from __future__ import annotations

import json
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import conninfo

from cbmir.index.errors import DatabaseError, IndexConfigError
from cbmir.locations import without_credentials

URL_SCHEMES = ("postgresql://", "postgres://")
CONNECT_TIMEOUT_SECONDS = 10
LOCK_TIMEOUT_SECONDS = 30  # how long a writer waits for another one (SQLite's busy timeout, the same)
WRITER_LOCK = 0x63626D6972  # the advisory lock key of the one writer of a PostgreSQL store ("cbmir")


class Rows(Protocol):
    """What `Database.execute` returns: a cursor of either backend."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


def is_database_url(location: object) -> bool:
    """Whether `location` names a PostgreSQL database (a ``postgresql://`` URL) rather than a file or folder."""
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


@dataclass(frozen=True)
class PostgresAddress:
    """A ``postgresql://user[:password]@host:port/dbname[?options]`` URL, understood by libpq (so also
    ``PGPASSWORD`` and ``~/.pgpass`` supply a password the URL leaves out)."""

    url: str = field(repr=False)  # it may hold the password
    user: str
    host: str
    port: str
    dbname: str

    @classmethod
    def parse(cls, url: str) -> PostgresAddress:
        try:
            parts = conninfo.conninfo_to_dict(url)
        except psycopg.Error as error:  # its message may quote the URL, so it is not shown
            raise IndexConfigError(
                f"{without_credentials(url)} is not a PostgreSQL URL ({type(error).__name__}); expected "
                "postgresql://user@host:port/dbname"
            ) from None
        return cls(
            url,
            user=str(parts.get("user") or "(the login user)"),
            host=str(parts.get("host") or "localhost"),
            port=str(parts.get("port") or "5432"),
            dbname=str(parts.get("dbname") or "(the user's database)"),
        )

    @property
    def name(self) -> str:
        """The URL as messages show it: user, host, port and database, never the password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def folder_name(self) -> str:
        """A folder name of its own for this database (host, port and name; for the default vector folder)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.host}-{self.port}-{self.dbname}")


def open_database(location: str | Path) -> Database:
    """The database of a store: a PostgreSQL URL, or else the path of a SQLite file."""
    if is_database_url(location):
        return PostgresDatabase(PostgresAddress.parse(str(location)))
    return SqliteDatabase(Path(location))


class Database(ABC):
    """One connection to a store's database. Not thread-safe by itself: the store serialises its use."""

    kind: str  # "sqlite" or "postgresql"
    name: str  # for messages: the file, or the URL without its password
    TYPES: dict[str, str]  # the column types of CREATE statements, by the names `ddl` fills in

    def ddl(self, statement: str) -> str:
        """A CREATE statement with its ``{type}`` names filled in for this backend."""
        return statement.format(**self.TYPES)

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """Run one statement with ``?`` placeholders."""

    @abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters."""

    @abstractmethod
    def insert_returning(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        """Run ``INSERT ... RETURNING id`` for each row; the ids, in row order."""

    @abstractmethod
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction: the only one in the database while it runs; committed at the end, rolled
        back on any error."""

    @abstractmethod
    def counter(self, table: str) -> int:
        """The highest id `table` ever held (its AUTOINCREMENT counter), 0 when none. Transactional:
        removing the newest rows leaves it, and a rolled-back insert does not move it."""

    @abstractmethod
    def counted(self, table: str, column: str) -> list[str]:
        """The statements (beside the table's own) that keep `counter` for `table`, whose id is `column`."""

    @abstractmethod
    def refusing(self, table: str, events: Sequence[str], message: str) -> list[str]:
        """Triggers that make each of `events` (UPDATE, DELETE) on `table` fail with `message`."""

    @abstractmethod
    def prefix_match(self, column: str, prefix: str) -> tuple[str, str]:
        """The condition "`column` starts with `prefix`" (answered from an index on `column`) and its parameter."""

    @abstractmethod
    def in_list(self, column: str, values: Iterable[Any]) -> tuple[str, Any]:
        """The condition "`column` is one of `values`" and its one parameter."""

    @abstractmethod
    def nocase_equals(self, column: str) -> str:
        """The condition "`column` equals the parameter, ignoring the case of a-z" on a ``{text_nocase}`` column."""

    @abstractmethod
    def nocase_index(self, table: str, column: str) -> list[str]:
        """The index that answers `nocase_equals` on `column`, where the column's own index does not."""

    @abstractmethod
    def json_array_contains(self, column: str) -> str:
        """The condition "the JSON array in `column` holds the integer parameter"."""

    @abstractmethod
    def removed(self) -> None:
        """After rows were deleted: push their bytes out of the files where the backend can."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection (refreshing the planner's statistics where that is cheap)."""


class SqliteDatabase(Database):
    """A SQLite file in WAL mode: a crash never corrupts it, and a committed transaction survives a process
    crash (``synchronous=NORMAL``); removed rows are overwritten (``secure_delete``)."""

    kind = "sqlite"
    TYPES = {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "blob": "BLOB",
        "real": "REAL",
        "text": "TEXT",
        "text_nocase": "TEXT COLLATE NOCASE",
        "covering": "",  # an index entry holds the rowid (the id) already
        "table_options": "",
        "without_rowid": " WITHOUT ROWID",
    }

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        try:
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=LOCK_TIMEOUT_SECONDS
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: never corrupt, and a process crash loses nothing
            self._db.execute("PRAGMA secure_delete=ON")  # removed rows are overwritten, not just unlinked
        except sqlite3.Error as error:
            raise IndexConfigError(f"{path} cannot be opened as a cbmir store: {error}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as error:
            raise DatabaseError(self.name, str(error)) from None

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.Error as error:
            raise DatabaseError(self.name, str(error)) from None

    def insert_returning(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        return [self.execute(sql, row).fetchall()[0][0] for row in rows]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.execute("ROLLBACK")
            raise
        self.execute("COMMIT")

    def counter(self, table: str) -> int:
        row = self.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return 0 if row is None else int(row[0])

    def counted(self, table: str, column: str) -> list[str]:
        return []  # AUTOINCREMENT keeps sqlite_sequence

    def refusing(self, table: str, events: Sequence[str], message: str) -> list[str]:
        return [
            f"CREATE TRIGGER IF NOT EXISTS {table}_no_{event.lower()} BEFORE {event} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            for event in events
        ]

    def prefix_match(self, column: str, prefix: str) -> tuple[str, str]:
        return f"{column} GLOB ?", re.sub(r"([*?\[\]])", r"[\1]", prefix) + "*"

    def in_list(self, column: str, values: Iterable[Any]) -> tuple[str, Any]:
        return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(list(values))

    def nocase_equals(self, column: str) -> str:
        return f"{column} = ?"

    def nocase_index(self, table: str, column: str) -> list[str]:
        return []  # the column's NOCASE collation serves its own index

    def json_array_contains(self, column: str) -> str:
        return f"EXISTS (SELECT 1 FROM json_each({column}) WHERE value = ?)"

    def removed(self) -> None:
        self.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the overwritten pages leave the WAL file too

    def close(self) -> None:
        self.execute("PRAGMA optimize")  # refresh the planner's statistics for the filter indexes
        self._db.close()


class PostgresDatabase(Database):
    """A PostgreSQL database (psycopg 3, autocommit outside `transaction`). Committed transactions are
    durable as the server's settings make them; a client killed mid-transaction leaves nothing (the server
    rolls it back). Deleted rows are gone for every reader at once, but their bytes stay in the table
    files until VACUUM reuses the space (``VACUUM FULL`` rewrites them)."""

    kind = "postgresql"
    TYPES = {
        "id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",  # a sequence: ids never reused
        "blob": "BYTEA",
        "real": "DOUBLE PRECISION",  # SQLite's REAL is 8 bytes too
        "text": 'TEXT COLLATE "C"',
        "text_nocase": 'TEXT COLLATE "C"',  # compared through lower(), see nocase_equals
        "covering": " INCLUDE (id)",  # filters list ids from the index alone
        # an embedding row (2 KiB at 512-d) stays in the table instead of being compressed and moved out
        "table_options": " WITH (toast_tuple_target = 8160)",
        "without_rowid": "",
    }

    def __init__(self, address: PostgresAddress):
        self.address, self.name = address, address.name
        self._open_transactions = 0  # nested ones too: no reconnecting until the outermost has ended
        try:
            self._db = self._connect()
        except psycopg.Error as error:
            raise IndexConfigError(f"cannot connect to {self._server()}: {self._reason(error)}") from None

    def _server(self) -> str:
        address = self.address
        return f"the PostgreSQL database {address.dbname!r} at {address.host} port {address.port} as {address.user}"

    def _connect(self) -> psycopg.Connection:
        options = conninfo.conninfo_to_dict(self.address.url)
        options.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
        options.setdefault("application_name", "cbmir")
        connection = psycopg.connect(**options, autocommit=True)  # type: ignore[arg-type]
        connection.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'")
        return connection

    def _connection(self) -> psycopg.Connection:
        """The connection, made again first when the server dropped it (a restart, a failover, a terminated
        session) and no transaction is open. Nothing is lost: a transaction the break cut off was rolled
        back whole by the server and failed its caller; this process's state lives in the tables. A server
        that does not answer again is a `DatabaseError` for this statement; the next one tries again."""
        if self._db.broken and not self._open_transactions:
            try:
                self._db = self._connect()
            except psycopg.Error as error:
                raise DatabaseError(self.name, f"cannot reconnect to {self._server()}: {self._reason(error)}") from None
        return self._db

    def _reason(self, error: Exception) -> str:
        """The server's or libpq's message, on one line, with any password that might be in it masked."""
        text = " ".join(str(error).split()) or type(error).__name__
        password = conninfo.conninfo_to_dict(self.address.url).get("password")
        if password:
            text = text.replace(str(password), "***")
        return without_credentials(text)

    @staticmethod
    def _placeholders(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        try:
            return self._connection().execute(self._placeholders(sql), params)
        except psycopg.Error as error:
            raise DatabaseError(self.name, self._reason(error)) from None

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self._connection().cursor().executemany(self._placeholders(sql), rows)
        except psycopg.Error as error:
            raise DatabaseError(self.name, self._reason(error)) from None

    def insert_returning(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        if not rows:
            return []
        cursor = self._connection().cursor()
        try:
            cursor.executemany(self._placeholders(sql), rows, returning=True)
            ids = []
            while True:
                ids.append(int(cursor.fetchone()[0]))  # type: ignore[index]
                if not cursor.nextset():
                    return ids
        except psycopg.Error as error:
            raise DatabaseError(self.name, self._reason(error)) from None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        try:
            with self._connection().transaction():
                self._open_transactions += 1
                try:
                    self.execute("SELECT pg_advisory_xact_lock(?)", (WRITER_LOCK,))
                    yield
                finally:
                    self._open_transactions -= 1
        except psycopg.Error as error:  # the commit itself failed
            raise DatabaseError(self.name, self._reason(error)) from None

    def counter(self, table: str) -> int:
        row = self.execute("SELECT seq FROM cbmir_sequence WHERE name = ?", (table,)).fetchone()
        return 0 if row is None else int(row[0])

    def counted(self, table: str, column: str) -> list[str]:
        # sqlite_sequence, kept by a trigger in the inserting transaction (a sequence would move on a rollback)
        return [
            f"CREATE TABLE IF NOT EXISTS cbmir_sequence (name {self.TYPES['text']} PRIMARY KEY, seq BIGINT NOT NULL)",
            """CREATE OR REPLACE FUNCTION cbmir_count() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO cbmir_sequence (name, seq) VALUES (TG_TABLE_NAME, (to_jsonb(NEW) ->> TG_ARGV[0])::bigint)
                ON CONFLICT (name) DO UPDATE SET seq = greatest(cbmir_sequence.seq, excluded.seq);
                RETURN NULL;
            END $$""",
            f"CREATE OR REPLACE TRIGGER {table}_counter AFTER INSERT ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION cbmir_count('{column}')",
        ]

    def refusing(self, table: str, events: Sequence[str], message: str) -> list[str]:
        function = """CREATE OR REPLACE FUNCTION cbmir_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION '%', TG_ARGV[0]; END $$"""
        triggers = [
            f"CREATE OR REPLACE TRIGGER {table}_no_{event.lower()} BEFORE {event} ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION cbmir_refuse('{message}')"
            for event in events
        ]
        if "DELETE" in events:  # TRUNCATE deletes without firing row triggers
            triggers.append(
                f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} FOR EACH STATEMENT "
                f"EXECUTE FUNCTION cbmir_refuse('{message}')"
            )
        return [function, *triggers]

    def prefix_match(self, column: str, prefix: str) -> tuple[str, str]:
        # LIKE 'prefix%' on a "C"-collated column is a range scan of its index
        return f"{column} LIKE ?", re.sub(r"([\\%_])", r"\\\1", prefix) + "%"

    def in_list(self, column: str, values: Iterable[Any]) -> tuple[str, Any]:
        return f"{column} = ANY(?)", list(values)

    def nocase_equals(self, column: str) -> str:
        return f"lower({column}) = lower(?)"  # lower() of the "C" collation folds a-z only, as NOCASE

    def nocase_index(self, table: str, column: str) -> list[str]:
        return [f"CREATE INDEX IF NOT EXISTS {table}_{column}_nocase ON {table} (lower({column}))"]

    def json_array_contains(self, column: str) -> str:
        return f"{column}::jsonb @> jsonb_build_array(?::bigint)"

    def removed(self) -> None:
        """Nothing can be done at once: VACUUM (autovacuum) frees the space later."""

    def close(self) -> None:
        self._db.close()
