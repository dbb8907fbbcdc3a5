"""torchrun's command line through real agents: a static rendezvous hosted by node rank 0 (ranks
follow --node-rank), a c10d one hosted by the endpoint's host, and the console flags."""

import psutil
import pytest

from .agents import STEPS, Agent, new_mark, processes_with_mark, read_events, wait_for
from tests.support import quiet_port

pytestmark = pytest.mark.integration



@pytest.fixture
def agents(tmp_path):
    mark = new_mark()
    started = []

    def start(name, args, script_args=()):
        stop = tmp_path / "stop"
        agent = Agent([*args, "--log-dir", tmp_path / "logs", STEPS, "--stop-file", stop,
                       *script_args], tmp_path, name, mark, env={"TMPDIR": str(tmp_path)})
        started.append(agent)
        return agent

    start.stop_file = tmp_path / "stop"
    start.log_dir = tmp_path / "logs"
    yield start
    for agent in started:
        agent.stop()
    assert processes_with_mark(mark) == [], "processes outlived the test's agents"
    assert not list(tmp_path.glob("elastic-etcd-*")), "a hosted etcd's data dir was left"


def test_static_rendezvous_node_rank_zero_hosts_and_holds_rank_zero(agents):
    port = quiet_port()
    flags = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
             "--master-port", port, "--rdzv-conf", "last_call_timeout=0.5"]
    # Node rank 1 first: it waits for the host, and still gets global rank 1.
    second = agents("node1", [*flags, "--node-rank", "1", "--role", "trainer"])
    wait_for(lambda: "waiting up to 60 s for the node hosting the rendezvous" in second.output(),
             timeout=60, what="node rank 1 to wait for the host")
    first = agents("node0", [*flags, "--node_rank", "0"])
    wait_for(lambda: "world=2 rank=0" in first.output(), timeout=90, what="node 0 training")
    wait_for(lambda: "world=2 rank=1" in second.output(), timeout=30, what="node 1 training")
    assert "this node hosts the job's rendezvous (etcd) at 127.0.0.1:" in first.output()
    [rdzv] = [e for e in read_events(agents.log_dir) if e["event"] == "rendezvous"][:1]
    # Node ids are <host>-<agent pid>-<random>: node rank 0's agent is the first member.
    assert [m.split("-")[-2] for m in rdzv["members"]] == [str(first.proc.pid),
                                                            str(second.proc.pid)]
    agents.stop_file.touch()
    assert second.wait(60) == 0 and first.wait(60) == 0


def test_c10d_endpoint_on_this_machine_is_hosted_by_one_agent_and_joined_by_the_other(agents):
    endpoint = f"127.0.0.1:{quiet_port()}"
    flags = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", endpoint, "--rdzv-conf", "last_call_timeout=0.5,join_settle=0.3"]
    a = agents("a", flags)
    wait_for(lambda: "world=1 rank=0" in a.output(), timeout=90, what="a training alone")
    b = agents("b", flags)
    wait_for(lambda: "world=2 rank=1" in b.output(), timeout=90, what="b joining a")
    hosts = [x for x in (a, b) if "hosts the job's rendezvous" in x.output()]
    assert hosts == [a]
    agents.stop_file.touch()
    assert b.wait(60) == 0 and a.wait(60) == 0


def test_local_ranks_filter_and_redirects_keep_output_off_the_console_not_out_of_the_logs(
        agents):
    a = agents("a", ["--nproc-per-node", "2", "--local-ranks-filter", "1", "--redirects", "1:2"],
               ["--step-sleep", "0.01"])
    wait_for(lambda: (agents.log_dir / "round1" / "rank0.log").exists()
             and "STEP" in (agents.log_dir / "round1" / "rank0.log").read_text(),
             timeout=60, what="rank 0 stepping")
    agents.stop_file.touch()
    assert a.wait(60) == 0
    out = a.output()
    assert "[rank1]: STEP" in out and "[rank0]:" not in out
    assert "DONE world=2 rank=0" in (agents.log_dir / "round1" / "rank0.log").read_text()


def test_role_tee_and_ignored_flags_in_a_running_job(agents):
    # --preload none: the workers' environment is read from /proc below, which shows a
    # zygote-forked worker's as the zygote's.
    a = agents("a", ["--nproc-per-node", "2", "--role", "trainer", "--tee", "3",
                     "--start-method", "fork", "--run-path", "--preload", "none"],
               ["--step-sleep", "0.1"])
    wait_for(lambda: "world=2 rank=1" in a.output(), timeout=60, what="training")
    workers = [p for p in psutil.Process(a.proc.pid).children()
               if any("steps.py" in part for part in p.cmdline())]
    assert {w.environ()["ROLE_NAME"] for w in workers} == {"trainer"} and len(workers) == 2
    agents.stop_file.touch()
    assert a.wait(60) == 0
    out = a.output()
    [note] = [line for line in out.splitlines() if "torchrun options without effect" in line]
    assert "--start-method (workers are always new processes" in note and "--run-path" in note
    # --tee: on the console and in the log files
    assert "[rank1]: STEP" in out
    assert "STEP" in (agents.log_dir / "round1" / "rank1.log").read_text()
