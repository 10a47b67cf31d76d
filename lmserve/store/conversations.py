"""The conversation store: stored responses (the Responses API) and conversations (the
Conversations API: an id, metadata, and an ordered list of items) in SQLite, through the standard
library, in one file under the server's data folder or in memory.

Each stored response keeps its whole input context (the items of the turns before it, their
outputs, and its own input), so a response stays continuable whatever else is deleted, and its
input items list is one read. Every row belongs to an owner (a hash of the API key that made it,
or "" on a server without keys); a row another owner asks for is as absent as a missing one.

Writes are durable when they return: WAL journal with a sync at every commit, so a crash loses at
most the reply being generated. One connection serves every thread, behind a lock; the calls are
short, and the routes make them from worker threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "lmserve.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,    -- the Response object, as JSON
    input_items TEXT NOT NULL  -- its whole input context, as a JSON list of items
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conversation_items (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
);
"""


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message says where and why."""


@dataclass(frozen=True)
class Conversation:
    id: str
    created_at: int
    metadata: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}


@dataclass(frozen=True)
class StoredResponse:
    id: str
    created_at: int
    response: dict[str, Any]
    input_items: list[dict[str, Any]]

    @property
    def context(self) -> list[dict[str, Any]]:
        """What a response continuing this one starts from: its input items, then its output."""
        return self.input_items + list(self.response.get("output") or [])


class ConversationStore:
    """Stored responses, by owner. `path` None keeps them in memory for the server's life."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the conversation store at {path}: {exc}") from exc

    @classmethod
    def in_folder(cls, data_dir: Path | None) -> ConversationStore:
        """The store of a data folder (its FILE_NAME), or an in-memory one for None."""
        return cls(None if data_dir is None else data_dir / FILE_NAME)

    def put_response(self, owner: str, stored: StoredResponse) -> None:
        row = (stored.id, owner, stored.created_at, json.dumps(stored.response), json.dumps(stored.input_items))
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)

    def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute("SELECT id, created_at, response, input_items FROM responses "
                                   "WHERE id = ? AND owner = ?", (response_id, owner)).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], json.loads(row[2]), json.loads(row[3]))

    def delete_response(self, owner: str, response_id: str) -> bool:
        """Delete it; False if the owner has no such response."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        return cursor.rowcount > 0

    # ---- conversations

    def create_conversation(self, owner: str, conversation: Conversation, items: list[dict[str, Any]]) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?)",
                             (conversation.id, owner, conversation.created_at, json.dumps(conversation.metadata)))
            self._append(conversation.id, items)

    def get_conversation(self, owner: str, conversation_id: str) -> Conversation | None:
        with self._lock:
            row = self._db.execute("SELECT id, created_at, metadata FROM conversations WHERE id = ? AND owner = ?",
                                   (conversation_id, owner)).fetchone()
        return None if row is None else Conversation(row[0], row[1], json.loads(row[2]))

    def list_conversations(self, owner: str) -> list[Conversation]:
        """The owner's conversations, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, created_at, metadata FROM conversations WHERE owner = ? "
                                    "ORDER BY created_at DESC, rowid DESC", (owner,)).fetchall()
        return [Conversation(row[0], row[1], json.loads(row[2])) for row in rows]

    def update_conversation(self, owner: str, conversation_id: str, metadata: dict[str, str]) -> bool:
        with self._lock:
            cursor = self._db.execute("UPDATE conversations SET metadata = ? WHERE id = ? AND owner = ?",
                                      (json.dumps(metadata), conversation_id, owner))
        return cursor.rowcount > 0

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner))
        return cursor.rowcount > 0

    def add_items(self, owner: str, conversation_id: str, items: list[dict[str, Any]]) -> bool:
        """Append `items` in order; False if the owner has no such conversation."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            if not self._owns(owner, conversation_id):
                return False
            self._append(conversation_id, items)
        return True

    def items(self, owner: str, conversation_id: str) -> list[dict[str, Any]] | None:
        """The conversation's items, oldest first; None if the owner has no such conversation."""
        with self._lock:
            if not self._owns(owner, conversation_id):
                return None
            rows = self._db.execute("SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY position",
                                    (conversation_id,)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def delete_item(self, owner: str, conversation_id: str, item_id: str) -> bool:
        with self._lock:
            if not self._owns(owner, conversation_id):
                return False
            cursor = self._db.execute("DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?",
                                      (conversation_id, item_id))
        return cursor.rowcount > 0

    def _owns(self, owner: str, conversation_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?",
                                (conversation_id, owner)).fetchone() is not None

    def _append(self, conversation_id: str, items: list[dict[str, Any]]) -> None:
        last = self._db.execute("SELECT COALESCE(MAX(position), -1) FROM conversation_items WHERE conversation_id = ?",
                                (conversation_id,)).fetchone()[0]
        self._db.executemany("INSERT INTO conversation_items VALUES (?, ?, ?, ?)",
                             [(conversation_id, last + 1 + i, item["id"], json.dumps(item)) for i, item in enumerate(items)])

    def close(self) -> None:
        with self._lock:
            self._db.close()
