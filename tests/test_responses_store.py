"""The Responses store on its own (a real SQLite file, a settable clock): bounds, owners, items, reopening."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from server.serving.responses_store import ResponseStore


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def open_store(path, clock, max_stored=3, max_age=100.0) -> ResponseStore:
    return ResponseStore(path, max_stored=max_stored, max_age=max_age, clock=clock)


def response(i: int) -> dict:
    return {"id": f"resp_{i}", "output": [{"id": f"msg_{i}", "type": "message", "content": []},
                                          {"id": f"fc_{i}", "type": "function_call", "call_id": f"call_{i}"}]}


def test_count_bound_evicts_the_oldest_first(tmp_path, clock):
    store = open_store(tmp_path / "r.sqlite3", clock)
    for i in range(5):
        clock.now -= 1  # evicted by insertion order, even if the wall clock went backwards
        store.put("alice", response(i), [{"role": "user", "content": str(i)}])
    assert [store.get("alice", f"resp_{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert store.item("alice", "msg_1") is None and store.item("alice", "fc_4")["call_id"] == "call_4"
    rows = sqlite3.connect(tmp_path / "r.sqlite3").execute("SELECT count(*) FROM items").fetchone()[0]
    assert rows == 6  # the evicted responses took their item index rows with them


def test_age_bound_hides_then_purges(tmp_path, clock):
    store = open_store(tmp_path / "r.sqlite3", clock, max_stored=10)
    store.put("alice", response(0), [])
    clock.now += 60
    store.put("alice", response(1), [])
    clock.now += 50  # resp_0 is now 110 s old, resp_1 50 s
    assert store.get("alice", "resp_0") is None and store.item("alice", "msg_0") is None
    assert store.get("alice", "resp_1") is not None
    store.put("alice", response(2), [])  # a write purges what has expired
    ids = sqlite3.connect(tmp_path / "r.sqlite3").execute("SELECT id FROM responses ORDER BY rowid").fetchall()
    assert ids == [("resp_1",), ("resp_2",)]


def test_owners_never_see_each_others_responses_or_items(tmp_path, clock):
    store = open_store(tmp_path / "r.sqlite3", clock)
    store.put("alice", response(0), [{"role": "user", "content": "secret"}])
    assert store.get("bob", "resp_0") is None and store.item("bob", "msg_0") is None
    assert not store.delete("bob", "resp_0")
    assert store.get("alice", "resp_0").messages == [{"role": "user", "content": "secret"}]
    assert store.delete("alice", "resp_0") and not store.delete("alice", "resp_0")
    assert store.get("alice", "resp_0") is None and store.item("alice", "msg_0") is None


def test_a_reopened_store_keeps_everything_and_the_file_is_private(tmp_path, clock):
    path = tmp_path / "nested" / "r.sqlite3"
    store = open_store(path, clock)
    assert not path.exists()  # nothing on disk until the first use
    store.put("alice", response(7), [{"role": "user", "content": "你好"}])
    store.close()
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = open_store(path, clock)
    kept = again.get("alice", "resp_7")
    assert kept.response == response(7) and kept.messages == [{"role": "user", "content": "你好"}]


def test_concurrent_writers_from_threads(tmp_path, clock):
    store = open_store(tmp_path / "r.sqlite3", clock, max_stored=1000)
    threads = [threading.Thread(target=lambda k=k: [store.put("alice", response(k * 100 + i), []) for i in range(50)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(store.get("alice", f"resp_{k * 100 + i}") for k in range(4) for i in range(50))
