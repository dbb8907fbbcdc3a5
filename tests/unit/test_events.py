import json
import multiprocessing

from launcher.events import (EventBus, EventLogFile, JobFinished, Rendezvous, Rescale, Waiting,
                             WorkerFailed, read_events)

WRITERS = 6
EVENTS_PER_WRITER = 150
# Larger than a pipe buffer and stdio's buffer, so a non-atomic writer would interleave.
PADDING = "x" * 9000


def logging_bus(path, node, clock=None):
    bus = EventBus(node, clock=clock) if clock else EventBus(node)
    bus.subscribe(EventLogFile(str(path)))
    return bus


def test_record_has_schema_keys_and_the_events_own_fields(tmp_path):
    path = tmp_path / "events.jsonl"
    bus = logging_bus(path, "node-a", clock=lambda: 1700000000.25)

    stamped = bus.emit(Rescale(round=3, world_size=4, members=("node-a", "node-b"),
                               cause="node_joined", duration_s=1.5))

    assert stamped.to_dict() == {
        "time": 1700000000.25, "event": "rescale", "node": "node-a", "round": 3,
        "world_size": 4, "members": ["node-a", "node-b"], "cause": "node_joined",
        "duration_s": 1.5,
    }
    assert read_events(str(path)) == [stamped.to_dict()]


def test_common_keys_not_given_are_null_and_own_fields_not_given_are_left_out(tmp_path):
    path = tmp_path / "events.jsonl"
    logging_bus(path, "node-b", clock=lambda: 5.0).emit(JobFinished(exit_code=0))

    assert read_events(str(path)) == [{
        "time": 5.0, "event": "job_finished", "node": "node-b", "round": None,
        "world_size": None, "members": None, "cause": None, "exit_code": 0,
    }]


def test_every_listener_hears_every_event_and_a_failing_one_does_not_stop_the_others():
    heard = []
    bus = EventBus("node-a")

    def broken(_stamped):
        raise RuntimeError("listener bug")
    bus.subscribe(broken)
    bus.subscribe(heard.append)

    stamped = bus.emit(Waiting(round=2, members=("node-a",)))

    assert heard == [stamped] and stamped.event.round == 2 and stamped.node == "node-a"
    assert isinstance(stamped.time, float)


def test_log_directory_is_created(tmp_path):
    path = tmp_path / "run" / "logs" / "events.jsonl"
    logging_bus(path, "node-a").emit(Rendezvous(round=0))

    assert [r["event"] for r in read_events(str(path))] == ["rendezvous"]


def test_read_events_skips_a_trailing_partial_line(tmp_path):
    path = tmp_path / "events.jsonl"
    bus = logging_bus(path, "node-a")
    bus.emit(Rendezvous(round=0))
    bus.emit(WorkerFailed(round=0, rank=1, exit_code=1, pid=42, cause="exit"))
    with open(path, "a") as f:
        f.write('{"time": 1.0, "event": "job_fa')

    assert [r["event"] for r in read_events(str(path))] == ["rendezvous", "worker_failed"]


def test_read_events_rejects_a_file_that_is_not_an_event_log(tmp_path):
    import pytest

    path = tmp_path / "notes.txt"
    path.write_text("hello\n")

    with pytest.raises(ValueError, match="notes.txt:1"):
        read_events(str(path))


def _append_many(path, node):
    bus = logging_bus(path, node)
    for seq in range(EVENTS_PER_WRITER):
        bus.emit(Rescale(round=seq, cause=PADDING))


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
        mine = [r["round"] for r in records if r["node"] == f"node-{i}"]
        assert mine == list(range(EVENTS_PER_WRITER))
    assert all(r["cause"] == PADDING for r in records)
    assert read_events(path) == records
