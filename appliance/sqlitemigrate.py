"""Numbered schema migrations for the app's SQLite files (request log, stored responses).

``PRAGMA user_version`` holds how many migrations a file has; each missing one runs in its own
``BEGIN IMMEDIATE`` transaction and is re-checked inside it, so two processes opening the same
file at once never apply one twice. A file from a newer appliance is refused, never downgraded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence


def apply_migrations(conn: sqlite3.Connection, migrations: Sequence[str], too_new: Callable[[int], Exception]) -> int:
    """Bring the file to ``len(migrations)``; ``too_new(version)`` is raised for a newer file."""
    target = len(migrations)
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > target:
        raise too_new(version)
    for number in range(version, target):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) == number:  # not done by another process
                for statement in migrations[number].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return target
