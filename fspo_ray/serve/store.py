"""Users' stored preference histories: one small interface, two real back ends.

`open_store(url)`: a SQLite file (`sqlite:///path/to/file.db`, or a bare path; WAL mode, so readers never
wait for a writer) for one machine, PostgreSQL (`postgresql://user@host/db`) when replicas run on several.
Both keep the same two tables — pairs, and the answers the service returned to a user (so that feedback
can name them by id) — and answer the same calls, so one test suite runs against both.

Every query is parameterized: a user id or a text reaches the database as a value, never as SQL. Writes
are idempotent (a pair's id is the client's: the same id again with the same content is a no-op, with
other content a conflict) and bounded (a user holds at most `max_pairs_per_user`), both checked inside
one transaction per call, which also serializes a user's writers: two replicas appending at once lose
and duplicate nothing, and a writer killed midway leaves nothing half-written.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")  # also a pair's and an answer's id
MAX_PAIRS_PER_USER = 1_000
MAX_ANSWERS_PER_USER = 100  # answers kept for feedback by id; older ones are forgotten

SCHEMA = [  # {serial} is each back end's auto-incrementing key: the order pairs were stored in
    """CREATE TABLE IF NOT EXISTS pairs (
        seq {serial}, user_id TEXT NOT NULL, pair_id TEXT NOT NULL, question TEXT NOT NULL,
        preferred TEXT NOT NULL, dispreferred TEXT NOT NULL, source TEXT NOT NULL, created REAL NOT NULL,
        UNIQUE (user_id, pair_id))""",
    "CREATE INDEX IF NOT EXISTS pairs_by_user ON pairs (user_id, seq)",
    """CREATE TABLE IF NOT EXISTS answers (
        seq {serial}, user_id TEXT NOT NULL, answer_id TEXT NOT NULL, question TEXT NOT NULL,
        answer TEXT NOT NULL, created REAL NOT NULL, UNIQUE (user_id, answer_id))""",
    "CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY)",  # the row a user's writers lock
]


class StoreError(ValueError):
    """A request the store refuses: `status` is the HTTP status that says why (404, 409, 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredPair:
    pair_id: str
    question: str
    preferred: str
    dispreferred: str
    source: str = "api"  # "api" (appended) or "feedback"
    created: float = 0.0
    seq: int = 0  # the store's order: newer pairs have larger ones


def check_id(value: str, what: str = "user_id") -> str:
    if not isinstance(value, str) or not USER_ID.fullmatch(value):
        raise StoreError(422, f"{what} must be 1-128 characters of letters, digits and ._@:- (starting with a"
                              " letter or digit)")  # fmt: skip
    return value


class Store:
    """The calls the service and the export make; each is one transaction. Subclasses say how to connect,
    how to lock a user and how placeholders are spelled."""

    placeholder = "?"
    serial = ""

    def __init__(self, max_pairs_per_user: int = MAX_PAIRS_PER_USER):
        self.max_pairs_per_user = max_pairs_per_user
        with self._transaction() as db:
            self._lock_schema(db)
            for statement in SCHEMA:
                db.execute(statement.format(serial=self.serial))

    def _lock_schema(self, db) -> None:
        """Replicas starting together create the tables one at a time."""

    def _sql(self, query: str) -> str:
        return query.replace("?", self.placeholder)

    @contextmanager
    def _transaction(self, lock_user: str | None = None) -> Iterator:
        raise NotImplementedError

    def append(self, user_id: str, pairs: list[StoredPair]) -> list[bool]:
        """Store the pairs in order; for each, whether it was new (False: that id was stored already, with
        the same content). A pair id stored with other content is a 409; past the user's limit, a 413."""
        check_id(user_id)
        added = []
        with self._transaction(lock_user=user_id) as db:
            (count,) = db.execute(self._sql("SELECT COUNT(*) FROM pairs WHERE user_id = ?"), (user_id,)).fetchone()
            for pair in pairs:
                check_id(pair.pair_id, "id")
                row = db.execute(self._sql("SELECT question, preferred, dispreferred FROM pairs"
                                           " WHERE user_id = ? AND pair_id = ?"), (user_id, pair.pair_id)).fetchone()
                if row is not None:
                    if tuple(row) != (pair.question, pair.preferred, pair.dispreferred):
                        raise StoreError(409, f"pair id {pair.pair_id!r} is stored with other content")
                    added.append(False)
                    continue
                if count >= self.max_pairs_per_user:
                    raise StoreError(413, f"the user has {count} pairs, the limit is {self.max_pairs_per_user}:"
                                          " delete the user's history to start again")  # fmt: skip
                db.execute(self._sql("INSERT INTO pairs (user_id, pair_id, question, preferred, dispreferred,"
                                     " source, created) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                           (user_id, pair.pair_id, pair.question, pair.preferred, pair.dispreferred, pair.source,
                            time.time()))  # fmt: skip
                count += 1
                added.append(True)
        return added

    def recent(self, user_id: str, limit: int, before: int | None = None) -> list[StoredPair]:
        """The user's newest `limit` pairs stored before `before` (a pair's seq), newest first."""
        check_id(user_id)
        with self._transaction() as db:
            rows = db.execute(self._sql("SELECT pair_id, question, preferred, dispreferred, source, created, seq"
                                        " FROM pairs WHERE user_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"),
                              (user_id, 2**62 if before is None else before, limit)).fetchall()  # fmt: skip
        return [StoredPair(*row) for row in rows]

    def remember_answer(self, user_id: str, answer_id: str, question: str, answer: str) -> None:
        """An answer the service returned to the user, for feedback that names it; the oldest beyond
        MAX_ANSWERS_PER_USER are forgotten."""
        check_id(user_id)
        with self._transaction(lock_user=user_id) as db:
            db.execute(self._sql("INSERT INTO answers (user_id, answer_id, question, answer, created)"
                                 " VALUES (?, ?, ?, ?, ?)"), (user_id, answer_id, question, answer, time.time()))
            db.execute(self._sql("DELETE FROM answers WHERE user_id = ? AND seq NOT IN (SELECT seq FROM answers"
                                 " WHERE user_id = ? ORDER BY seq DESC LIMIT ?)"),
                       (user_id, user_id, MAX_ANSWERS_PER_USER))  # fmt: skip

    def answer(self, user_id: str, answer_id: str) -> tuple[str, str]:
        """(question, answer) of an answer returned to this user; 404 if there is none by that id."""
        with self._transaction() as db:
            row = db.execute(self._sql("SELECT question, answer FROM answers WHERE user_id = ? AND answer_id = ?"),
                             (check_id(user_id), check_id(answer_id, "answer id"))).fetchone()  # fmt: skip
        if row is None:
            raise StoreError(404, f"no answer {answer_id!r} was returned to this user (or it was forgotten)")
        return tuple(row)

    def delete_user(self, user_id: str) -> int:
        """Forget everything about the user; the number of pairs deleted."""
        check_id(user_id)
        with self._transaction(lock_user=user_id) as db:
            (count,) = db.execute(self._sql("SELECT COUNT(*) FROM pairs WHERE user_id = ?"), (user_id,)).fetchone()
            for table in ("pairs", "answers", "users"):  # table names are ours, never a client's
                db.execute(self._sql(f"DELETE FROM {table} WHERE user_id = ?"), (user_id,))
        return count

    def all_pairs(self) -> Iterator[tuple[str, StoredPair]]:
        """(user id, pair) for every stored pair, by user, oldest first: what the export writes."""
        with self._transaction() as db:
            rows = db.execute("SELECT user_id, pair_id, question, preferred, dispreferred, source, created, seq"
                              " FROM pairs ORDER BY user_id, seq").fetchall()  # fmt: skip
        for user_id, *pair in rows:
            yield user_id, StoredPair(*pair)


class SQLiteStore(Store):
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: str, **limits):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.local = path, threading.local()  # sqlite3 connections stay in their thread
        super().__init__(**limits)

    def _connection(self) -> sqlite3.Connection:
        if getattr(self.local, "db", None) is None:
            # isolation_level=None: transactions are the explicit BEGIN below; a writer waits up to 30 s.
            self.local.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.local.db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        return self.local.db

    @contextmanager
    def _transaction(self, lock_user: str | None = None):
        db = self._connection()
        db.execute("BEGIN IMMEDIATE" if lock_user else "BEGIN")  # IMMEDIATE: one writer at a time, from the start
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


class PostgresStore(Store):
    placeholder = "%s"
    serial = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"

    def __init__(self, url: str, **limits):
        self.url, self.local = url, threading.local()  # a connection per thread (the replica's store threads)
        super().__init__(**limits)

    def _lock_schema(self, db) -> None:
        db.execute("SELECT pg_advisory_xact_lock(2029)")  # (SQLite's BEGIN already serializes this)

    def _connection(self):
        import psycopg

        db = getattr(self.local, "db", None)
        if db is None or db.closed or db.broken:  # a server restart breaks it: connect again
            db = self.local.db = psycopg.connect(self.url, autocommit=True)  # transactions are explicit
        return db

    @contextmanager
    def _transaction(self, lock_user: str | None = None):
        db = self._connection()
        with db.transaction():
            if lock_user:  # the user's row, locked until the transaction ends: their writers take turns
                db.execute("INSERT INTO users (user_id) VALUES (%s) ON CONFLICT DO NOTHING", (lock_user,))
                db.execute("SELECT user_id FROM users WHERE user_id = %s FOR UPDATE", (lock_user,))
            yield db


def open_store(url: str, **limits) -> Store:
    """`postgresql://…` (or `postgres://…`), `sqlite:///path`, or a plain path (SQLite; `~` is the home)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, **limits)
    return SQLiteStore(os.path.expanduser(url.removeprefix("sqlite://")), **limits)
