"""The errors of the index layer. Each message names the entry, field, file or id and the reason."""

from cbmir.errors import CbmirError


class SearchIndexError(CbmirError):
    """A problem with an index folder or with a request made to it."""


class IndexMismatchError(SearchIndexError):
    """Vectors of another model or dimension than the index holds."""


class IndexConfigError(SearchIndexError):
    """An index that cannot be opened as asked: bad index type, locked, unreadable or too new; a database
    that cannot be reached or refuses the credentials."""


class DatabaseError(SearchIndexError):
    """A statement the store's database failed (SQLite or PostgreSQL): the store's name (never a password)
    and the database's reason."""

    def __init__(self, store: str, reason: str):
        super().__init__(f"{store}: {reason}")
        self.reason = reason


class EntryError(SearchIndexError):
    """An image entry that cannot be stored; the message names the entry."""


class DuplicateImageError(EntryError):
    """An entry whose content hash is already stored, or given twice in one batch."""


class QueryError(SearchIndexError):
    """A bad request: invalid filter, k or query vector, or an unknown field."""


class UnknownImageError(QueryError):
    """An image id that is not in the index (never added, or removed)."""
