"""In-place rescale: survivors keep their processes, also when a peer dies inside a collective."""
import re
import time

import pytest

from .agents import (STEPS, Agent, new_mark, processes_with_mark, read_events, wait_for,
                     workers_of)

pytestmark = pytest.mark.integration

SCRIPT = "tests/integration/scripts/allreduce_loop.py"


def pids_in(text, world):
    return {int(p) for p in re.findall(rf"world={world} rank=\d+ pid=(\d+)", text)}


def test_peer_killed_inside_an_allreduce_survivors_resume_without_restart(
        tmp_path, etcd_endpoint, run_id):
    mark, stop, logs = new_mark(), tmp_path / "stop", tmp_path / "logs"
    args = ["--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-endpoint", etcd_endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2,lease_ttl=60",
            "--log-dir", logs, SCRIPT, "--stop-file", stop]
    a = Agent(args, tmp_path, "a", mark)
    b = None
    try:
        wait_for(lambda: "world=2 rank=0" in a.output(), timeout=60, what="a alone")
        b = Agent(args, tmp_path, "b", mark)
        wait_for(lambda: "world=4 rank=0" in a.output(), timeout=60, what="a and b together")
        before = len(a.output())
        b.kill_node()
        wait_for(lambda: "world=2 rank=0" in a.output()[before:], timeout=60,
                 what="a alone again after b's death")
        stop.touch()
        assert a.wait(60) == 0, a.output()[-3000:]
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()
    out = a.output()
    # Each of a's two workers kept its process through the join and through b's death.
    assert pids_in(out, 2) == pids_in(out, 4) and len(pids_in(out, 2)) == 2
    events = read_events(logs)
    assert [e["world_size"] for e in events
            if e["event"] == "rescale" and e["node"] == events[0]["node"]] == [4, 2]
    assert not [e for e in events if e["event"] == "worker_failed" and e["cause"] == "exit"]
    assert processes_with_mark(mark) == []


def test_a_hung_rank_is_dumped_killed_and_the_job_reforms(tmp_path, etcd_endpoint, run_id):
    mark, stop, logs = new_mark(), tmp_path / "stop", tmp_path / "logs"
    agent = Agent(["--nproc-per-node", "2", "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", run_id,
                   "--hang-timeout", "3", "--max-restarts", "1", "--log-dir", logs,
                   SCRIPT, "--stop-file", stop, "--hang-at", "30"], tmp_path, "a", mark)
    try:
        wait_for(lambda: any(e["event"] == "worker_hung" for e in read_events(logs)),
                 timeout=60, what="the hang to be detected")
        wait_for(lambda: any(e["event"] == "rescale" for e in read_events(logs)),
                 timeout=60, what="the job re-formed")
        stop.touch()
        assert agent.wait(60) == 0, agent.output()[-3000:]
    finally:
        agent.stop()
    out = agent.output()
    hung = [e for e in read_events(logs) if e["event"] == "worker_hung"]
    # Rank 0 waits for rank 1 inside an all-reduce, so it stalls too; both are replaced.
    assert 1 in {e["local_rank"] for e in hung} and all(e["idle_s"] > 3 for e in hung)
    # Its stacks were dumped to its log before it was killed: the frame it hung in is named.
    assert "in stuck_forever" in out
    rescale = [e for e in read_events(logs) if e["event"] == "rescale"]
    assert rescale[0]["restart_count"] == 1 and rescale[0]["cause"] == "worker_failed"
    assert processes_with_mark(mark) == []


def test_a_node_joining_while_the_first_workers_start_keeps_their_processes(
        tmp_path, etcd_endpoint, run_id):
    """--rescale-mode auto: the scale-up waits for the starting workers' hello, so they follow
    it in place instead of being restarted before they ever used the API."""
    mark, stop, logs = new_mark(), tmp_path / "stop", tmp_path / "logs"
    args = ["--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-endpoint", etcd_endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
            "--log-dir", logs, SCRIPT, "--stop-file", stop, "--start-delay", "4"]
    a = Agent(args, tmp_path, "a", mark)
    b = None
    try:
        wait_for(lambda: any(e["event"] == "rendezvous" for e in read_events(logs)),
                 timeout=60, what="a's first workers to be started")
        first_workers = {p.pid for p in workers_of(a.proc.pid)}
        time.sleep(1.0)  # a's workers are still starting (--start-delay)
        b = Agent(args, tmp_path, "b", mark)
        wait_for(lambda: "world=4 rank=0" in a.output(), timeout=90, what="a and b together")
        stop.touch()
        assert a.wait(60) == 0, a.output()[-3000:]
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()
    assert pids_in(a.output(), 4) == first_workers and len(first_workers) == 2
    events = read_events(logs)
    a_node = events[0]["node"]
    [rescale] = [e for e in events if e["event"] == "rescale" and e["node"] == a_node]
    assert rescale["world_size"] == 4 and rescale["in_place"] is True
    assert processes_with_mark(mark) == []


def test_a_plain_script_waits_for_a_hello_only_once_then_restarts_on_every_change(
        tmp_path, etcd_endpoint, run_id):
    mark, stop, logs = new_mark(), tmp_path / "stop", tmp_path / "logs"
    args = ["--nnodes", "1:3", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
            "--log-dir", logs, STEPS, "--stop-file", stop]
    agents = [Agent(args, tmp_path, "a", mark)]
    try:
        wait_for(lambda: any(e["event"] == "rendezvous" for e in read_events(logs)),
                 timeout=60, what="a's first workers to be started")
        time.sleep(1.0)
        agents.append(Agent(args, tmp_path, "b", mark))
        wait_for(lambda: "world=2 rank=0" in agents[0].output(), timeout=90, what="world of 2")
        agents.append(Agent(args, tmp_path, "c", mark))
        wait_for(lambda: "world=3 rank=0" in agents[0].output(), timeout=90, what="world of 3")
        stop.touch()
        assert all(agent.wait(60) == 0 for agent in agents)
    finally:
        for agent in agents:
            agent.stop()
    said = "workers did not use the in-place API within 10 s of starting"
    assert agents[0].output().count(said) == 1
    rescales = [e for e in read_events(logs) if e["event"] == "rescale"
                and e["node"] == read_events(logs)[0]["node"]]
    assert [e["in_place"] for e in rescales] == [False, False]
    assert processes_with_mark(mark) == []


def test_forced_in_place_mode_prewarms_every_node_and_grows_in_place(tmp_path, etcd_endpoint,
                                                                    run_id):
    mark, stop, logs = new_mark(), tmp_path / "stop", tmp_path / "logs"
    args = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
            "--rescale-mode", "in-place", "--log-dir", logs, SCRIPT, "--stop-file", stop]
    a = Agent(args, tmp_path, "a", mark)
    b = None
    try:
        wait_for(lambda: "world=1 rank=0" in a.output(), timeout=60, what="a alone")
        b = Agent(args, tmp_path, "b", mark)
        wait_for(lambda: "world=2 rank=0" in a.output(), timeout=90, what="a and b together")
        stop.touch()
        assert a.wait(60) == 0 and b.wait(60) == 0
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()
    events = read_events(logs)
    # Even the first node started its workers in standby before it registered.
    assert [e["cause"] for e in events if e["event"] == "joined"] == ["prewarmed", "prewarmed"]
    assert [(e["world_size"], e["in_place"]) for e in events if e["event"] == "rescale"
            and e["node"] == events[0]["node"]] == [(2, True)]
    assert pids_in(a.output(), 1) == pids_in(a.output(), 2)
    assert processes_with_mark(mark) == []
