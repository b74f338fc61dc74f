"""Users, roles and the audit trail on a real SQLite store."""
