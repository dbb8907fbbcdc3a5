"""The job's event log: one JSON object per line, appended by every agent of the job.

Schema of a record (every record has all of the first seven keys):
    time        unix seconds (float) when the agent emitted it
    event       what happened, one of the names below
    node        id of the agent's node
    round       round number the event belongs to, or null
    world_size  workers in that round, or null
    members     node ids of that round in rank order, or null
    cause       why it happened (e.g. "join", "node_left", "sigterm"), or null
    ...         event-specific fields, listed with each event

Events:
    rendezvous    the first round this node runs in
    rescale       a later round; duration_s = time from the cause to this node's workers starting
    waiting       the job is below min nodes; this node runs no workers until more join
    worker_failed rank, exit_code, pid of the first worker of the round that failed
    node_left     this agent is leaving the job (cause: sigterm, sigint, ...)
    job_finished  exit_code
    job_failed    reason, exit_code

Several agents on one host may share the file: each record is one write() on an O_APPEND
descriptor, which the kernel appends as a whole, so lines are never split or interleaved.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, List, Optional

RENDEZVOUS = "rendezvous"
RESCALE = "rescale"
WAITING = "waiting"
WORKER_FAILED = "worker_failed"
NODE_LEFT = "node_left"
JOB_FINISHED = "job_finished"
JOB_FAILED = "job_failed"

_RESERVED = ("time", "node")


class EventLog:
    """Appends this node's events to a shared file (or only returns them when path is None)."""

    def __init__(self, path: Optional[str], node_id: str, clock: Callable[[], float] = time.time):
        self.path = path
        self.node_id = node_id
        self._clock = clock
        if path is not None:
            # Fail at startup, not at the first event, if the file cannot be written.
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))

    def emit(self, event: str, **fields) -> dict:
        """Record one event and return the record.

        Raises:
            ValueError: fields tries to set time or node, which the log owns.
        """
        clash = [key for key in _RESERVED if key in fields]
        if clash:
            raise ValueError(f"event fields {clash} are set by the event log itself")
        record = {
            "time": self._clock(), "event": event, "node": self.node_id,
            "round": None, "world_size": None, "members": None, "cause": None,
        }
        record.update(fields)
        if self.path is not None:
            # default=str: an odd field value must not take the agent down with it.
            data = (json.dumps(record, default=str) + "\n").encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)  # unbuffered: nothing is left to flush
                while written < len(data):  # only on a full disk or a signal; keep the rest
                    written += os.write(fd, data[written:])
            finally:
                os.close(fd)
        return record


def read_events(path: str) -> List[dict]:
    """All whole records in the file, oldest first; a trailing line still being written is skipped.

    Raises:
        FileNotFoundError: no event was ever logged at path.
        ValueError: a whole line is not JSON (the file is not an event log).
    """
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # the last piece has no newline yet
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not an event record: {exc}") from exc
    return records
