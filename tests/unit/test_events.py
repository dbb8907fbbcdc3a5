import json
import multiprocessing

import pytest

from launcher.events import EventLog, read_events

WRITERS = 6
EVENTS_PER_WRITER = 150
# Larger than a pipe buffer and stdio's buffer, so a non-atomic writer would interleave.
PADDING = "x" * 9000


def test_record_has_schema_keys_and_extra_fields(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), "node-a", clock=lambda: 1700000000.25)

    record = log.emit("rescale", round=3, world_size=4, members=("node-a", "node-b"),
                      cause="join", duration_s=1.5)

    assert record == {
        "time": 1700000000.25, "event": "rescale", "node": "node-a", "round": 3,
        "world_size": 4, "members": ("node-a", "node-b"), "cause": "join", "duration_s": 1.5,
    }
    assert read_events(str(path)) == [dict(record, members=["node-a", "node-b"])]


def test_keys_not_given_are_null(tmp_path):
    path = tmp_path / "events.jsonl"
    EventLog(str(path), "node-b", clock=lambda: 5.0).emit("job_finished", exit_code=0)

    assert read_events(str(path)) == [{
        "time": 5.0, "event": "job_finished", "node": "node-b", "round": None,
        "world_size": None, "members": None, "cause": None, "exit_code": 0,
    }]


def test_without_a_path_records_are_returned_and_nothing_is_written(tmp_path):
    log = EventLog(None, "node-a")

    record = log.emit("waiting", round=2, members=["node-a"])

    assert record["event"] == "waiting" and record["round"] == 2
    assert isinstance(record["time"], float)
    assert list(tmp_path.iterdir()) == []


def test_fields_cannot_override_time_or_node():
    with pytest.raises(ValueError, match="node"):
        EventLog(None, "node-a").emit("rendezvous", node="someone-else")


def test_log_directory_is_created(tmp_path):
    path = tmp_path / "run" / "logs" / "events.jsonl"
    EventLog(str(path), "node-a").emit("rendezvous", round=0)

    assert [r["event"] for r in read_events(str(path))] == ["rendezvous"]


def test_read_events_skips_a_trailing_partial_line(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), "node-a")
    log.emit("rendezvous", round=0)
    log.emit("worker_failed", round=0, rank=1, exit_code=1, pid=42)
    with open(path, "a") as f:
        f.write('{"time": 1.0, "event": "job_fa')

    assert [r["event"] for r in read_events(str(path))] == ["rendezvous", "worker_failed"]


def test_read_events_rejects_a_file_that_is_not_an_event_log(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")

    with pytest.raises(ValueError, match="notes.txt:1"):
        read_events(str(path))


def _append_many(path, node):
    log = EventLog(path, node)
    for seq in range(EVENTS_PER_WRITER):
        log.emit("rescale", round=seq, seq=seq, padding=PADDING)


def test_concurrent_writers_produce_only_whole_lines(tmp_path):
    path = str(tmp_path / "events.jsonl")
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_append_many, args=(path, f"node-{i}")) for i in range(WRITERS)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
    assert [w.exitcode for w in writers] == [0] * WRITERS

    with open(path) as f:
        lines = f.read().split("\n")
    assert lines[-1] == ""
    records = [json.loads(line) for line in lines[:-1]]  # raises if any line was torn
    assert len(records) == WRITERS * EVENTS_PER_WRITER
    for i in range(WRITERS):
        mine = [r["seq"] for r in records if r["node"] == f"node-{i}"]
        assert mine == list(range(EVENTS_PER_WRITER))
    assert all(r["padding"] == PADDING for r in records)
    assert read_events(path) == records
