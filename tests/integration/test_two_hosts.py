"""A job across two simulated hosts (network namespaces joined by a veth pair, private
addresses): each agent's workers must listen on, and tell their peers, the shared network's
interface, with no variable set by hand. On one machine's loopback this cannot go wrong."""
import re
import subprocess
import sys

import psutil
import pytest

from tests.support import require_horovod

from .agents import REPO, Agent, kill_tree, new_mark, processes_with_mark, read_events, wait_for
from .hosts import HostPair, unavailable

pytestmark = pytest.mark.integration

WHY = unavailable()
if WHY:
    pytest.skip(f"two-host tests need network namespaces: {WHY}", allow_module_level=True)

SCRIPTS = REPO / "tests" / "integration" / "scripts"
ETCD_PORT = 2379
RDZV_CONF = "last_call_timeout=0.3,join_settle=0.2,lease_ttl=60"


@pytest.fixture
def cluster(tmp_path, run_id):
    """Two hosts, an etcd on the first (`python -m rendezvous`), and start(name, host, args)."""
    pair = HostPair()
    mark = new_mark()
    first, second = pair.hosts
    endpoint = f"{first.address}:{ETCD_PORT}"
    env = dict(PYTHONPATH=str(REPO), ELASTIC_TEST_MARK=mark, TMPDIR=str(tmp_path))
    etcd_log = open(tmp_path / "etcd.out", "wb")
    etcd = subprocess.Popen([*first.prefix, sys.executable, "-m", "rendezvous", "--listen",
                             endpoint], stdout=etcd_log, stderr=subprocess.STDOUT,
                            env={**__import__("os").environ, **env}, cwd=REPO,
                            start_new_session=True)
    agents = []

    def start(name, host, args):
        agent = Agent(["--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--rdzv-conf",
                       RDZV_CONF, "--log-dir", tmp_path / "logs", *args], tmp_path, name, mark,
                      prefix=host.prefix)
        agents.append(agent)
        return agent

    start.hosts, start.log_dir, start.stop_file = pair.hosts, tmp_path / "logs", tmp_path / "stop"
    try:
        wait_for(lambda: "rendezvous endpoint" in (tmp_path / "etcd.out").read_text(),
                 timeout=30, what="etcd on the first host")
        yield start
    finally:
        for agent in agents:
            agent.stop()
        kill_tree(etcd)
        etcd_log.close()
        pair.close()
    assert processes_with_mark(mark) == [], "processes outlived the test"


def pids_in(text, world):
    return {int(p) for p in re.findall(rf"world={world} rank=\d+ pid=(\d+)", text)}


def test_join_and_sigkilled_host_across_two_hosts_with_no_variable_set_by_hand(cluster):
    first, second = cluster.hosts
    # --preload none: the workers' environment is read from /proc below, which shows a
    # zygote-forked worker's as the zygote's.
    args = ["--nnodes", "1:2", "--nproc-per-node", "2", "--preload", "none",
            SCRIPTS / "allreduce_loop.py", "--stop-file", cluster.stop_file]
    a = cluster("a", first, args)
    wait_for(lambda: "world=2 rank=0" in a.output(), timeout=90, what="a training alone")
    b = cluster("b", second, args)
    wait_for(lambda: "world=4 rank=2" in b.output(), timeout=90, what="b joining a, in place")
    # Each agent told its workers the interface of its own address on the shared network.
    for agent, host in ((a, first), (b, second)):
        workers = [p for p in psutil.Process(agent.proc.pid).children()]
        assert {w.environ()["GLOO_SOCKET_IFNAME"] for w in workers} == {host.iface}
    before = len(a.output())
    b.kill_node()
    wait_for(lambda: "world=2 rank=0" in a.output()[before:], timeout=60,
             what="a alone again after b's host died")
    cluster.stop_file.touch()
    assert a.wait(60) == 0, a.output()[-3000:]
    out = a.output()
    assert pids_in(out, 2) == pids_in(out, 4) and len(pids_in(out, 4)) == 2  # in place
    events = read_events(cluster.log_dir)
    joined = {e["node"]: e for e in events if e["event"] == "joined"}
    assert len(joined) == 2
    a_node = next(e["node"] for e in events if e["event"] == "rendezvous")
    assert [e["world_size"] for e in events if e["event"] == "rescale"
            and e["node"] == a_node] == [4, 2]
    assert any(e["event"] == "node_left" and e["cause"] == "removed" for e in events)


@pytest.mark.horovod
def test_horovod_job_across_two_hosts_grows_and_shrinks(cluster):
    require_horovod()  # fails instead under CI
    first, second = cluster.hosts
    args = ["--backend", "horovod", "--nnodes", "1:2", "--nproc-per-node", "1",
            SCRIPTS / "hvd_elastic.py", "--stop-file", cluster.stop_file]
    a = cluster("a", first, args)
    wait_for(lambda: "size=1 rank=0" in a.output(), timeout=120, what="a training alone")
    b = cluster("b", second, args)
    wait_for(lambda: re.search(r"STEP \S+ step=\d+ size=2 rank=0", a.output()), timeout=120,
             what="a stepping with b")
    before = len(a.output())
    b.kill_node()
    wait_for(lambda: re.search(r"STEP \S+ step=\d+ size=1 rank=0", a.output()[before:]),
             timeout=120, what="a alone again after b's host died")
    cluster.stop_file.touch()
    assert a.wait(60) == 0, a.output()[-3000:]
    pids = set(re.findall(r"STEP \S+ step=\d+ size=\d rank=0 pid=(\d+)", a.output()))
    assert len(pids) == 1, "a's worker was restarted"
