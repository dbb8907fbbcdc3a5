"""Elastic jobs of 2-3 agents as separate processes on 127.0.0.1 sharing one real etcd."""
import signal
import time

import pytest

from .agents import (STEPS, Agent, new_mark, processes_with_mark, read_events, wait_for,
                     worlds_started)

pytestmark = pytest.mark.integration

# A long lease proves the fast path: a dead node must be gone long before its lease would expire.
RDZV_CONF = "last_call_timeout=0.5,join_settle=0.3,lease_ttl=60"


@pytest.fixture
def job(tmp_path, etcd_endpoint, run_id):
    mark = new_mark()
    agents = []
    log_dir = tmp_path / "logs"
    stop_file = tmp_path / "stop"

    def start(name, nnodes="1:3", nproc=1, extra=(), script_extra=(), env=None):
        args = ["--nnodes", nnodes, "--nproc-per-node", nproc, "--rdzv-endpoint", etcd_endpoint,
                "--rdzv-id", run_id, "--rdzv-conf", RDZV_CONF, "--log-dir", log_dir,
                "--monitor-interval", "0.1", *extra, STEPS, "--stop-file", stop_file,
                *script_extra]
        agent = Agent(args, tmp_path, name, mark, env=env)
        agents.append(agent)
        return agent

    start.log_dir, start.stop_file, start.mark = log_dir, stop_file, mark
    yield start
    for agent in agents:
        agent.stop()
    assert processes_with_mark(mark) == [], "processes outlived the test's agents"


def stepping(agent, world, since=0):
    """Wait until the agent's rank-0 worker prints a training step in a world of `world` after
    output position `since`; return the new output position."""
    needle = f"world={world} rank=0"
    wait_for(lambda: needle in agent.output()[since:], timeout=60,
             what=f"a step in a world of {world} on {agent.name}")
    return len(agent.output())


def test_grows_as_agents_join_shrinks_on_sigkill_and_sigterm_then_finishes(job):
    a = job("a")
    pos = stepping(a, 1)
    started = {"b": time.time()}
    b = job("b")
    pos = stepping(a, 2, pos)
    started["c"] = time.time()
    c = job("c")
    pos = stepping(a, 3, pos)
    assert worlds_started(job.log_dir) == [1, 2, 2, 3, 3, 3]

    killed = time.time()
    c.kill_node()
    pos = stepping(a, 2, pos)
    left = [e for e in read_events(job.log_dir) if e["event"] == "node_left"]
    assert left and left[-1]["cause"] == "removed"

    terminated = time.time()
    b.signal(signal.SIGTERM)
    assert b.wait(30) == 128 + signal.SIGTERM
    stepping(a, 1, pos)
    assert any(e["event"] == "node_left" and e["cause"] == "sigterm"
               for e in read_events(job.log_dir))

    job.stop_file.touch()
    assert a.wait(60) == 0
    out = a.output()
    for world in (1, 2, 3):
        assert f"world={world} rank=0" in out, f"no step in a world of {world}:\n{out[-3000:]}"
    events = read_events(job.log_dir)
    assert events[-1]["event"] == "job_finished" and events[-1]["exit_code"] == 0
    rescales = [e for e in events if e["event"] == "rescale"]
    # duration_s runs from the cause to the workers in the new world: the cause's time is at or
    # after the moment the test acted, and a join's is no later than the newcomer's `joined`.
    a_node = events[0]["node"]
    joined = [e["time"] for e in events if e["event"] == "joined" and e["node"] != a_node]
    causes = [e["time"] - e["duration_s"] for e in rescales if e["node"] == a_node]
    assert [e["cause"] for e in rescales if e["node"] == a_node] == [
        "node_joined", "node_joined", "node_left", "node_left"]
    acted = [started["b"], started["c"], killed, terminated]
    assert all(t - 0.01 <= cause for t, cause in zip(acted, causes)), (acted, causes)
    assert all(cause <= j + 0.01 for cause, j in zip(causes[:2], joined)), (causes, joined)
    assert all(cause <= nxt for cause, nxt in zip(causes, acted[1:]))
    assert {e["cause"] for e in rescales} >= {"node_joined", "node_left"}
    assert all(e["restart_count"] == 0 for e in rescales)  # membership changes are not failures


def test_leader_killed_another_agent_takes_over(job):
    a = job("a", nnodes="1:2")
    stepping(a, 1)
    b = job("b", nnodes="1:2")
    stepping(a, 2)
    a.kill_node()  # the first agent leads and hosts rank 0's store
    stepping(b, 1)
    job.stop_file.touch()
    assert b.wait(60) == 0
    assert "is now the rendezvous leader" in b.output()


def test_below_min_nodes_waits_join_timeout_then_fails(tmp_path, etcd_endpoint, run_id):
    mark = new_mark()
    agent = Agent(["--nnodes", "2:3", "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", run_id,
                   "--rdzv-conf", "join_timeout=2", STEPS, "--stop-file", tmp_path / "stop"],
                  tmp_path, "lonely", mark)
    try:
        code = agent.wait(60)
    finally:
        agent.stop()
    assert code == 1
    assert "error: job failed: only 1 of the 2 nodes needed joined within join_timeout=2s" in agent.output()
    assert processes_with_mark(mark) == []


def test_worker_failures_count_against_max_restarts(job):
    a = job("a", nnodes="1", nproc=2, extra=["--max-restarts", "1"],
            script_extra=["--fail-first-attempt"])
    stepping(a, 2)
    job.stop_file.touch()
    assert a.wait(60) == 0
    events = read_events(job.log_dir)
    failed = [e for e in events if e["event"] == "worker_failed"]
    assert failed and failed[0]["rank"] == 0 and failed[0]["exit_code"] == 3
    assert [e["restart_count"] for e in events if e["event"] == "rescale"] == [1]
    assert "world=2 rank=1" in a.output()


def test_worker_failure_beyond_max_restarts_fails_the_job_with_a_report(job):
    a = job("a", nnodes="1", nproc=2, script_extra=["--fail-first-attempt"])
    assert a.wait(60) == 3
    out = a.output()
    assert "error: job failed: rank 0 (local rank 0" in out
    assert "exited with code 3" in out and "max_restarts=0 exhausted" in out
    assert read_events(job.log_dir)[-1]["event"] == "job_failed"


def test_a_node_whose_workers_keep_failing_is_excluded_and_waits(job):
    """Blacklisting through running agents: b's workers fail at every start; after
    blacklist_after strikes b sits out (node_excluded), a trains on alone, b writes `waiting`."""
    conf = ["--max-restarts", "5", "--rdzv-conf",
            RDZV_CONF + ",blacklist_after=2,blacklist_cooldown=600"]
    a = job("a", nnodes="1:2", extra=conf)
    pos = stepping(a, 1)
    b = job("b", nnodes="1:2", extra=conf, script_extra=["--fail-if-env", "ELASTIC_TEST_FAIL"],
            env={"ELASTIC_TEST_FAIL": "1"})
    wait_for(lambda: any(e["event"] == "node_excluded" for e in read_events(job.log_dir)),
             timeout=90, what="b to be excluded")
    stepping(a, 1, pos)
    events = read_events(job.log_dir)
    b_node = next(e["node"] for e in events if e["event"] == "joined" and e["node"] != events[0]["node"])
    [excluded] = [e for e in events if e["event"] == "node_excluded"]
    assert excluded["nodes"] == [b_node] and excluded["cause"] == "repeated_failures"
    assert excluded["exclusions"] == 1 and excluded["until"] > excluded["time"] + 500
    assert b_node not in excluded["members"]
    failed = [e for e in events if e["event"] == "worker_failed" and e["node"] == b_node]
    assert len(failed) == 2 and {e["exit_code"] for e in failed} == {3}
    wait_for(lambda: any(e["event"] == "waiting" and e["node"] == b_node
                         for e in read_events(job.log_dir)), timeout=30, what="b waiting")
    job.stop_file.touch()
    assert a.wait(60) == 0
    assert b.wait(30) == 0  # a node sitting out ends with the job
