"""The conversation store (lmserve/store/conversations.py): what one connection writes another
reads back, owners never see each other's rows, and a folder it cannot use is a clear error."""

from __future__ import annotations

import sqlite3

import pytest

from lmserve.serve_settings import data_dir
from lmserve.store.conversations import FILE_NAME, Conversation, ConversationStore, StoreError, StoredResponse

RESPONSE = StoredResponse("resp_1", 100, {"id": "resp_1", "output": [{"id": "msg_2", "type": "message"}]},
                          [{"id": "msg_1", "type": "message"}])


def test_what_one_connection_writes_another_reads_and_every_write_is_synced(tmp_path):
    store = ConversationStore.in_folder(tmp_path)
    store.put_response("alice", RESPONSE)
    store.create_conversation("alice", Conversation("conv_1", 5, {"title": "t"}), [{"id": "a"}, {"id": "b"}])
    store.add_items("alice", "conv_1", [{"id": "c"}])
    # another connection (another process would do the same) reads it without the first closing
    reader = ConversationStore(tmp_path / FILE_NAME)
    assert reader.get_response("alice", "resp_1") == RESPONSE
    assert reader.get_response("alice", "resp_1").context == [{"id": "msg_1", "type": "message"},
                                                              {"id": "msg_2", "type": "message"}]
    assert [item["id"] for item in reader.items("alice", "conv_1")] == ["a", "b", "c"]
    mode = sqlite3.connect(tmp_path / FILE_NAME).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit returns once synced


def test_owners_never_see_each_others_rows():
    store = ConversationStore(None)
    store.put_response("alice", RESPONSE)
    store.create_conversation("alice", Conversation("conv_1", 5, {}), [])
    assert store.get_response("bob", "resp_1") is None and not store.delete_response("bob", "resp_1")
    assert store.get_conversation("bob", "conv_1") is None and store.items("bob", "conv_1") is None
    assert not store.add_items("bob", "conv_1", [{"id": "x"}]) and not store.delete_conversation("bob", "conv_1")
    assert not store.update_conversation("bob", "conv_1", {"t": "x"}) and store.list_conversations("bob") == []
    assert store.items("alice", "conv_1") == [] and store.get_response("alice", "resp_1") == RESPONSE


def test_deleting_a_conversation_deletes_its_items():
    store = ConversationStore(None)
    store.create_conversation("", Conversation("conv_1", 5, {}), [{"id": "a"}])
    assert store.delete_conversation("", "conv_1")
    store.create_conversation("", Conversation("conv_1", 6, {}), [])
    assert store.items("", "conv_1") == []


def test_a_folder_that_cannot_hold_the_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    with pytest.raises(StoreError, match="cannot open the conversation store at .*taken"):
        ConversationStore.in_folder(blocker)


def test_the_data_folder_is_the_users_unless_told(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert data_dir(None) == tmp_path / "lmserve"
    assert data_dir("none") is None and data_dir("NONE") is None
    assert data_dir(str(tmp_path / "x")) == tmp_path / "x"
