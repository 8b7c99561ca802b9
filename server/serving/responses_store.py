"""Stored /v1/responses (`store: true`): an SQLite file, each row owned by one caller, bounded by count and age.

A row keeps the Response as the client received it (what GET returns) and the conversation it ends: the history it
continued, its own input and its output, as OpenAI chat messages. `previous_response_id` so continues from one row,
even after the responses before it were evicted or deleted. The ids of its output items are indexed as well, for
`item_reference` inputs (the Vercel AI SDK refers to earlier assistant messages that way).

Every method blocks (disk I/O): call them from a worker thread. One connection serves all threads under a lock;
SQLite serializes writers anyway, and each call is one short transaction, committed before it returns, so a
restart (or a crash) keeps everything that was acknowledged.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,
    messages TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS items_by_response ON items (response_id);
"""


@dataclass
class StoredResponse:
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # the whole conversation up to and including this response's output


class ResponseStore:
    def __init__(self, path: str | os.PathLike[str], *, max_stored: int, max_age: float,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.max_stored, self.max_age, self.clock = max_stored, max_age, clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None  # opened on first use: an app that never stores creates no file

    @classmethod
    def from_settings(cls, settings) -> ResponseStore:
        return cls(settings.responses_store_path, max_stored=settings.responses_max_stored,
                   max_age=settings.responses_max_age)

    def put(self, owner: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        """Keep `response`, then drop what is past the age limit and the oldest beyond the count limit."""
        now = self.clock()
        with self._transaction() as db:
            db.execute("INSERT INTO responses (id, owner, created_at, response, messages) VALUES (?, ?, ?, ?, ?)",
                       (response["id"], owner, now, _json(response), _json(messages)))
            db.executemany("INSERT OR IGNORE INTO items (id, response_id) VALUES (?, ?)",
                           [(item["id"], response["id"]) for item in response.get("output", []) if item.get("id")])
            db.execute("DELETE FROM responses WHERE created_at < ?", (now - self.max_age,))
            # rowid grows with every insert, so it orders the rows oldest first whatever the clock did.
            db.execute("DELETE FROM responses WHERE rowid <= (SELECT rowid FROM responses ORDER BY rowid DESC "
                       "LIMIT 1 OFFSET ?)", (self.max_stored,))

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The caller's own, unexpired response; None for an unknown, foreign or expired id alike."""
        with self._transaction() as db:
            row = db.execute("SELECT response, messages FROM responses WHERE id = ? AND owner = ? AND created_at >= ?",
                             (response_id, owner, self.clock() - self.max_age)).fetchone()
        return StoredResponse(json.loads(row[0]), json.loads(row[1])) if row else None

    def item(self, owner: str, item_id: str) -> dict[str, Any] | None:
        """An output item of one of the caller's unexpired responses, by its id."""
        with self._transaction() as db:
            row = db.execute("SELECT r.response FROM items i JOIN responses r ON r.id = i.response_id "
                             "WHERE i.id = ? AND r.owner = ? AND r.created_at >= ?",
                             (item_id, owner, self.clock() - self.max_age)).fetchone()
        if row is None:
            return None
        return next((item for item in json.loads(row[0])["output"] if item.get("id") == item_id), None)

    def delete(self, owner: str, response_id: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                self._db = self._connect()
            with self._db:  # commits on leaving, rolls back on an exception
                yield self._db

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        if fresh:  # conversations are private: only the server's user may read the file (SQLite's -wal follows it)
            os.chmod(self.path, 0o600)
        db.execute("PRAGMA journal_mode = WAL")  # readers do not wait for a writer; commits are one append
        db.execute("PRAGMA foreign_keys = ON")  # deleting a response deletes its item index rows
        db.executescript(_SCHEMA)
        return db


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
