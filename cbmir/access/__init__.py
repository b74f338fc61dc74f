"""Who may use an index and what they did: users with roles and tokens (`cbmir.access.users`) and the
hash-chained audit trail (`cbmir.access.audit`), both kept in the index's store beside the images."""

from cbmir.access.audit import AuditRecord, AuditTrail, AuditWriteError, Event, Verification
from cbmir.access.users import Role, User, UserDirectory, UserError

__all__ = [
    "AuditRecord",
    "AuditTrail",
    "AuditWriteError",
    "Event",
    "Role",
    "User",
    "UserDirectory",
    "UserError",
    "Verification",
]
