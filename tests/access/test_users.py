"""Users and their tokens on a real store, SQLite and PostgreSQL: only a salted hash is kept, rotated and
disabled tokens are refused at once, and a second process sees the same users."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cbmir.access import Role, UserDirectory, UserError
from cbmir.access.users import TOKEN_SHAPE
from cbmir.index.store import Store


@pytest.fixture
def store(store_location):
    store = Store(store_location)
    yield store
    store.close()


def test_a_token_lets_its_user_in_and_is_never_stored(store, store_location):
    users = UserDirectory(store)
    token = users.add("ada", Role.annotator)
    assert TOKEN_SHAPE.fullmatch(token)
    user = users.authenticate(token)
    assert user is not None and (user.name, user.role) == ("ada", Role.annotator)
    assert users.authenticate(token) == user  # the remembered check gives the same answer
    secret = token.split("_", 2)[2]
    if isinstance(store_location, Path):
        raw = store_location.read_bytes() + Path(f"{store_location}-wal").read_bytes()
        assert secret.encode() not in raw and token.encode() not in raw
    with store.reading() as db:
        row = db.execute("SELECT * FROM users").fetchone()
    assert not any(token in str(value) or secret in str(value) for value in row)
    salt, digest = row[3], row[4]
    assert digest == hashlib.scrypt(secret.encode(), salt=salt, n=1 << 14, r=8, p=1, dklen=32)


@pytest.mark.parametrize(
    "change", ["wrong secret", "wrong key", "truncated", "not a cbmir token", "empty", "another user's secret"]
)
def test_wrong_tokens_are_refused(store, change):
    users = UserDirectory(store)
    token, other = users.add("ada", Role.admin), users.add("bob", Role.reader)
    prefix, key, secret = token.split("_", 2)
    forged = {
        "wrong secret": f"{prefix}_{key}_{secret[::-1]}",
        "wrong key": f"{prefix}_{'0' * 12}_{secret}",
        "truncated": token[:-1],
        "not a cbmir token": "x" * 60,
        "empty": "",
        "another user's secret": f"{prefix}_{key}_{other.split('_', 2)[2]}",
    }[change]
    assert users.authenticate(forged) is None


def test_rotating_and_disabling_take_effect_at_once(store, store_location):
    users = UserDirectory(store)
    old = users.add("ada", Role.reader)
    assert users.authenticate(old) is not None  # now remembered as verified
    new = users.rotate("ada")
    assert users.authenticate(old) is None and users.authenticate(new) is not None
    # a change made by another process (the `cbmir users` command beside a running server)
    other = Store(store_location)
    UserDirectory(other).set_disabled("ada", True)
    other.close()
    assert users.authenticate(new) is None
    users.set_disabled("ada", False)
    users.set_role("ada", Role.admin)
    user = users.authenticate(new)
    assert user is not None and user.role is Role.admin


def test_bad_names_roles_and_unknown_users_are_clear_errors(store):
    users = UserDirectory(store)
    users.add("ada", Role.reader)
    with pytest.raises(UserError, match="already exists"):
        users.add("ada", Role.admin)
    for name in ["", "-ada", "a b", "x" * 65, "ada;drop"]:
        with pytest.raises(UserError, match="user name"):
            users.add(name, Role.reader)
    with pytest.raises(UserError, match="no user 'bob'"):
        users.rotate("bob")
    with pytest.raises(UserError, match="no user 'bob'"):
        users.set_disabled("bob", True)
    assert [(user.name, user.role, user.disabled) for user in users.users()] == [("ada", Role.reader, False)]


def test_roles_are_ordered():
    assert Role.admin.allows(Role.annotator) and Role.annotator.allows(Role.reader)
    assert not Role.reader.allows(Role.annotator) and not Role.annotator.allows(Role.admin)
    assert all(role.allows(role) for role in Role)
