"""Preemption notices: a node that is told it will go away leaves at a step boundary, so the job
loses no committed step; a last node saves the state before it goes."""
import json
import re
from datetime import datetime, timedelta, timezone

import pytest
import torch

from tests.support import MetadataServer

from .agents import REPO, Agent, new_mark, processes_with_mark, read_events, wait_for
from .test_training_semantics import (assert_same_params, make_job, reference_params, seen,  # noqa: F401
                                      surviving_steps)

pytestmark = pytest.mark.integration

ALLREDUCE = REPO / "tests" / "integration" / "scripts" / "allreduce_loop.py"


def last_step(text, world):
    steps = re.findall(rf"step=(\d+) world={world} rank=0", text)
    return int(steps[-1])


def assert_left_at_a_step_boundary(job, survivor_output, expected, cause):
    """A node of a two-node job left on a notice: the survivor resumed at the step the two last
    trained together, no step was trained twice, the parameters equal one process's, and the
    event log says the node left at a step boundary for `cause`. Returns (notice, events)."""
    left_at = last_step(survivor_output, 2)
    assert f"RESUMED step={left_at} " in survivor_output.split(f"step={left_at} world=2")[-1]
    _, attempts = surviving_steps(job.records)
    recomputed = [s for s, recs in attempts.items() if len({r["round"] for r in recs}) > 1]
    assert recomputed == []
    assert_same_params(torch.load(job.out), expected)
    events = read_events(job.tmp / "logs")
    notice = next(e for e in events if e["event"] == "preemption_notice")
    assert notice["cause"] == cause
    left = [e for e in events if e["event"] == "node_left" and e["cause"] == cause]
    assert left and left[0]["outcome"] == "left at a step boundary"
    return notice, events


def test_a_preempted_node_costs_no_committed_step(make_job, tmp_path):
    expected = reference_params(make_job)
    job = make_job("preempted")
    notice = tmp_path / "b-notice"
    a = job.start("a")
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=1")
    b = job.start("b", extra=["--preemption-file", notice, "--preemption-poll-interval", "0.2"])
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=2", pos)
    job.allow(23)  # not a multiple of --commit-every: the notice lands between two commits
    pos = seen(a, "step=23 world=2 rank=0", pos)
    job.allow(10**6)
    pos = seen(a, "step=26 world=2 rank=0", pos)
    tmp = notice.with_suffix(".tmp")
    tmp.write_text("maintenance")
    tmp.replace(notice)
    assert b.wait(60) == 0, b.output()[-3000:]
    assert a.wait(120) == 0, a.output()[-3000:]
    notice, _ = assert_left_at_a_step_boundary(job, a.output(), expected, "file")
    assert notice["detail"] == "maintenance" and 25 < notice["grace_s"] <= 30


def test_the_last_node_checkpoints_within_the_grace_period(make_job, tmp_path):
    job = make_job("last")
    notice = tmp_path / "notice"
    args = ["--preemption-file", notice, "--preemption-poll-interval", "0.2"]
    first = job.start("first", nnodes="1", extra=args)
    job.allow(13)
    seen(first, "step=13 world=1 rank=0")
    notice.write_text("")
    assert first.wait(60) == 0, first.output()[-3000:]
    left = [e for e in read_events(job.tmp / "logs") if e["event"] == "node_left"]
    assert left[-1]["outcome"] == "checkpointed"
    notice.unlink()
    job.allow(10**6)
    second = job.start("second", nnodes="1")
    assert second.wait(120) == 0, second.output()[-3000:]
    # Step 13 is not a commit point of the script (every 4): the notice's checkpoint kept it.
    assert "RESUMED step=13 epoch=0" in second.output()


@pytest.mark.parametrize("preset", ["aws", "gce"])
def test_a_cloud_metadata_notice_makes_a_node_leave_within_its_deadline(tmp_path, etcd_endpoint,
                                                                        run_id, preset):
    """The aws and gce presets through a running agent, against a metadata endpoint on
    127.0.0.1: aws states its deadline (20 s here); gce does not, so --preemption-grace holds."""
    server = MetadataServer()
    mark, stop, logs = new_mark(), tmp_path / "stop", tmp_path / "logs"
    path = ("/latest/meta-data/spot/instance-action" if preset == "aws"
            else "/computeMetadata/v1/instance/preempted")
    server.answer(404 if preset == "aws" else 200, b"" if preset == "aws" else b"FALSE")
    common = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_endpoint,
              "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
              "--log-dir", logs]
    script = [ALLREDUCE, "--stop-file", stop]
    a = Agent([*common, *script], tmp_path, "a", mark)
    b = None
    try:
        wait_for(lambda: "world=1 rank=0" in a.output(), timeout=60, what="a alone")
        b = Agent([*common, "--preemption-preset", preset, "--preemption-url", server.url(path),
                   "--preemption-poll-interval", "0.2", "--preemption-grace", "12", *script],
                  tmp_path, "b", mark)
        wait_for(lambda: "world=2 rank=0" in a.output(), timeout=90, what="a and b together")
        if preset == "aws":
            deadline = datetime.now(timezone.utc) + timedelta(seconds=20)
            server.answer(200, json.dumps({"action": "terminate", "time": deadline.strftime(
                "%Y-%m-%dT%H:%M:%SZ")}).encode())
        else:
            server.answer(200, b"TRUE")
        assert b.wait(60) == 0, b.output()[-3000:]
        before = len(a.output())
        wait_for(lambda: "world=1 rank=0" in a.output()[before:], timeout=60, what="a alone again")
        stop.touch()
        assert a.wait(60) == 0
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()
        server.close()
    events = read_events(logs)
    [notice] = [e for e in events if e["event"] == "preemption_notice"]
    assert notice["cause"] == "metadata"
    if preset == "aws":
        assert notice["detail"].startswith("terminate at ") and 14 < notice["grace_s"] <= 20
    else:
        assert notice["detail"] == "preempted" and 10 < notice["grace_s"] <= 12
        assert all(h.get("Metadata-Flavor") == "Google" for _, h in server.requests)
    [left] = [e for e in events if e["event"] == "node_left" and e["cause"] == "metadata"]
    assert left["outcome"] == "left at a step boundary"
    assert processes_with_mark(mark) == []
