"""Users of the service: each has a name, a role and an API token of their own.

A token reads ``cbmir_<key>_<secret>``. The key (12 hex digits, not secret) names the user's row; the secret
is checked against a salted scrypt hash, and the token itself is never stored, so a copy of the store lets
no one in. A token is shown once, when it is made (`add`, `rotate`). Rotating replaces the hash, so the old
token is refused at its next request; so is a disabled user's.

scrypt is slow on purpose (tens of milliseconds), too slow for every request: a verified token is remembered
in memory under a digest of the token and the stored hash, so it is checked once per server start, and a
rotated token (another stored hash) or a disabled user (the row is read on every request) misses that
memory at once.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from cbmir.errors import CbmirError
from cbmir.index.store import Store

NAME_SHAPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
TOKEN_SHAPE = re.compile(r"cbmir_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
SCRYPT = {"n": 1 << 14, "r": 8, "p": 1, "dklen": 32}  # 16 MiB and tens of milliseconds per check
REMEMBERED_TOKENS = 10_000

_SCHEMA = [  # column types in braces: see cbmir.index.database
    """CREATE TABLE IF NOT EXISTS users (
        name {text} PRIMARY KEY,
        role {text} NOT NULL,
        token_key {text} NOT NULL UNIQUE,
        token_salt {blob} NOT NULL,
        token_hash {blob} NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at {text} NOT NULL,
        changed_at {text} NOT NULL)""",
]


class UserError(CbmirError):
    """A user name, role or change that cannot be used (an unknown or already existing user...)."""


class Role(enum.StrEnum):
    """What a user may do; each role may do everything the ones before it may."""

    reader = "reader"  # search and view
    annotator = "annotator"  # also propose, accept and correct codes
    admin = "admin"  # also add and remove images, and manage users

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {role: rank for rank, role in enumerate(Role)}


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    disabled: bool = False
    created_at: str = ""
    changed_at: str = ""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


def _new_token() -> tuple[str, str, bytes, bytes]:
    """A new token, and the key, salt and hash to store for it."""
    key, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
    return f"cbmir_{key}_{secret}", key, salt, _hash(secret, salt)


def check_name(name: str) -> str:
    if not NAME_SHAPE.fullmatch(name):
        raise UserError(
            f"user name {name[:80]!r}: use 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter "
            "or digit"
        )
    return name


class UserDirectory:
    """The users kept in one store, and the check of a token against them. Safe to share between threads."""

    def __init__(self, store: Store):
        self._store = store
        store.add_tables(_SCHEMA)
        self._verified: OrderedDict[bytes, None] = OrderedDict()

    def add(self, name: str, role: Role) -> str:
        """Add a user; returns their token (shown once: only its hash is kept)."""
        check_name(name)
        token, key, salt, digest = _new_token()
        with self._store.writing() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise UserError(f"user {name!r} already exists (give them a new token with 'cbmir users rotate')")
            now = _now()
            db.execute(
                "INSERT INTO users (name, role, token_key, token_salt, token_hash, created_at, changed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, role.value, key, salt, digest, now, now),
            )
        return token

    def rotate(self, name: str) -> str:
        """A new token for a user; the old one is refused from now on."""
        token, key, salt, digest = _new_token()
        self._change(name, "token_key = ?, token_salt = ?, token_hash = ?", (key, salt, digest))
        return token

    def set_disabled(self, name: str, disabled: bool) -> None:
        self._change(name, "disabled = ?", (int(disabled),))

    def set_role(self, name: str, role: Role) -> None:
        self._change(name, "role = ?", (role.value,))

    def _change(self, name: str, assignments: str, values: tuple[object, ...]) -> None:
        with self._store.writing() as db:
            changed = db.execute(
                f"UPDATE users SET {assignments}, changed_at = ? WHERE name = ?", (*values, _now(), name)
            ).rowcount
        if not changed:
            raise UserError(f"no user {name!r} (see 'cbmir users list')")

    def users(self) -> list[User]:
        with self._store.reading() as db:
            rows = db.execute("SELECT name, role, disabled, created_at, changed_at FROM users ORDER BY name")
            return [User(name, Role(role), bool(off), created, changed) for name, role, off, created, changed in rows]

    def has_users(self) -> bool:
        with self._store.reading() as db:
            return db.execute("SELECT EXISTS (SELECT 1 FROM users)").fetchone()[0] == 1

    def authenticate(self, token: str) -> User | None:
        """The enabled user whose token this is, or None."""
        shape = TOKEN_SHAPE.fullmatch(token)
        if shape is None:
            return None
        key, secret = shape.groups()
        with self._store.reading() as db:
            row = db.execute(
                "SELECT name, role, disabled, token_salt, token_hash FROM users WHERE token_key = ?", (key,)
            ).fetchone()
        if row is None or row[2]:
            return None
        name, role, _, salt, digest = row
        remembered = hashlib.sha256(token.encode() + digest).digest()
        if remembered in self._verified:
            self._verified.move_to_end(remembered)
        elif secrets.compare_digest(_hash(secret, salt), digest):
            self._verified[remembered] = None
            if len(self._verified) > REMEMBERED_TOKENS:
                self._verified.popitem(last=False)
        else:
            return None
        return User(name, Role(role))
