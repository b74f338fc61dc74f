"""A real PostgreSQL server for the tests: Debian's binaries, a cluster made by initdb in a temporary folder,
listening on a free loopback port (and a Unix socket in that folder), stopped and removed at the end.

PostgreSQL refuses to run as root, so as root the folder is given to the ``postgres`` user and every server
program runs through ``runuser``. Connections over TCP need the password (scram-sha-256), so a wrong one is
refused as in production; each test gets a database of its own, copied from a template.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

USER, PASSWORD = "cbmir", "pg-test-Secret-4711"
SERVER_USER = "postgres"  # who runs the server when the tests run as root


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl: the newest /usr/lib/postgresql/<version>/bin, else from PATH."""
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    if installed:
        return installed[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One running cluster. `url(dbname)` names a database on it; `new_database()` makes an empty one. Not
    `durable` (the tests): no fsync, which makes databases quick to create; durable (the benchmark): the
    server's defaults."""

    def __init__(self, bin_folder: Path, *, durable: bool = False):
        self.bin, self.durable = bin_folder, durable
        self.folder = Path(tempfile.mkdtemp(prefix="cbmir-postgres-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self._names = itertools.count()
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = ["runuser", "-u", SERVER_USER, "--", *args] if self._as_root else list(args)
        subprocess.run(command, check=True, capture_output=True, cwd=self.folder, timeout=120)

    def start(self) -> PostgresServer:
        password_file = self.folder / "password"
        password_file.write_text(PASSWORD + "\n")
        if self._as_root:
            shutil.chown(self.folder, SERVER_USER)
            shutil.chown(password_file, SERVER_USER)
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={password_file}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=60"
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        pg_ctl = str(self.bin / "pg_ctl")
        self._start_command = [pg_ctl, "-D", str(self.data), "-o", options, "-l", "log", "-w", "start"]
        self._run(*self._start_command)
        return self

    @contextmanager
    def down(self) -> Iterator[None]:
        """The server stopped for the block (fast mode: clients' connections cut, what was committed kept even
        without fsync), then started again on the same port and data."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        try:
            yield
        finally:
            self._run(*self._start_command)

    def url(self, dbname: str = "postgres", password: str | None = PASSWORD) -> str:
        credentials = USER if password is None else f"{USER}:{password}"
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(statement)

    def new_database(self) -> str:
        """A new, empty database (a copy of template0); its URL, with the password."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
