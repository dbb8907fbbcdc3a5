"""The shared pool on a real Ray cluster (`ray.cluster_utils.Cluster` on 127.0.0.1, one per module):
an elastic training job and gangs share it; the controller runs as its own process and is killed
and restarted; nodes are added and released through the test node provider."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rendezvous.client import JobClient
from rendezvous.embedded import EmbeddedEtcd

from .agents import REPO, new_mark, processes_with_mark, read_events, wait_for
from .test_training_semantics import SCRIPT, exactly_what_was_trained, surviving_steps

pytestmark = [pytest.mark.integration, pytest.mark.ray]
ray = pytest.importorskip("ray", reason="the Ray tests need Ray: pip install 'elastic-run[ray]'")

DATASET, EPOCHS = 200, 40  # 800 steps: paced by the allowance, so the job outlives the episode
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
               "health_check_timeout_ms": 500, "health_check_initial_delay_ms": 0}
GANG_SCRIPT = '''
import json, os, sys, time
import torch, torch.distributed as dist
env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
dist.init_process_group("gloo")  # env://, as torchrun's variables say
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
out = os.path.join(sys.argv[1], f"rank{env['RANK']}.json")
with open(out, "w") as f:
    json.dump({"env": env, "sum": t.item(), "time": time.time()}, f)
print("GANG", json.dumps(env), t.item(), flush=True)
time.sleep(float(sys.argv[2]))
dist.barrier()
dist.destroy_process_group()
os._exit(int(sys.argv[3]) if len(sys.argv) > 3 and env["RANK"] == "1" else 0)
'''


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind 127.0.0.1
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for every process of the test cluster
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH})
    nodes = [c.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=c.address, namespace="elastic-ray", logging_level="ERROR")
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def pool_etcd():
    """Each test its own etcd: the pool's records live under one prefix per etcd."""
    with EmbeddedEtcd() as etcd:
        yield etcd.endpoint


class ControllerProcess:
    def __init__(self, address, endpoint, tmp, queues=None, extra=()):
        self.args = [sys.executable, "-m", "integrations.ray", "controller", "--address", address,
                     "--rdzv-endpoint", endpoint, "--tick", "0.3", "--log-dir", str(tmp / "members")]
        if queues:
            self.args += ["--queues", str(queues)]
        self.args += list(extra)
        self.tmp, self.n, self.proc = tmp, 0, None
        self.start()

    def start(self):
        self.n += 1
        self.out = self.tmp / f"controller{self.n}.out"
        with open(self.out, "wb") as sink:
            self.proc = subprocess.Popen(self.args, stdout=sink, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_for(lambda: "controller: pool of" in self.out.read_text(), 60, what="controller")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def pool_command(endpoint, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "integrations.ray", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "ELASTIC_RDZV_ENDPOINT": endpoint})


def status(endpoint, name):
    from integrations.ray.client import PoolClient
    with PoolClient(endpoint) as pool:
        return pool.status(name)


def active_world(endpoint, job):
    from rendezvous.client import UnknownJobError
    with JobClient(endpoint) as jobs:
        try:
            st = jobs.status(job, probe=False, recent=0)
        except UnknownJobError:  # no agent has started yet
            return 0
        return st.round.world_size if st.round and st.round.active else 0


def rounds(tmp):
    return max(int(p.name.split("-")[0][5:]) for p in (tmp / "records").glob("round*.jsonl"))


def trained_at(tmp, world, after=0):
    """Some step was trained in a world of `world` ranks, in a round after `after`."""
    for p in (tmp / "records").glob("round*-rank0.jsonl"):
        if int(p.name.split("-")[0][5:]) > after:
            lines = p.read_text().splitlines()
            if lines and json.loads(lines[-1])["world"] == world:
                return True
    return False


def clear_pool():
    """End whatever a failed test left on the cluster (members are detached actors)."""
    from ray.util.placement_group import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup
    from ray.util import list_named_actors
    for entry in list_named_actors(all_namespaces=True):
        if entry["namespace"] == "elastic-ray":
            try:
                ray.kill(ray.get_actor(entry["name"], namespace="elastic-ray"))
            except ValueError:
                pass
    for pg_id, info in placement_group_table().items():
        if info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


class Pacer:
    """Raises the training job's step allowance a few steps a second (so it trains all through
    the episode and never ends before it), until `finish`."""

    def __init__(self, path, per_s=4.0):
        self.path, self.per_s, self.allowed = path, per_s, 0
        self._stop = threading.Event()
        self.write(0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def write(self, n):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(n))
        tmp.replace(self.path)

    def _run(self):
        while not self._stop.wait(1 / self.per_s):
            self.allowed += 1
            self.write(self.allowed)

    def finish(self):
        self._stop.set()
        self.thread.join()
        self.write(10**6)


def trainer(tmp_path, mark, size):
    """The training job of these tests: 1..size members of the exactly-once script, paced by
    the allowance file, recording every step under tmp_path/records."""
    from integrations.ray.spec import TRAIN, Submission
    return Submission(
        "trainer", TRAIN, (SCRIPT, "--checkpoint", tmp_path / "state.ckpt", "--out",
                           tmp_path / "params.pt", "--record-dir", tmp_path / "records",
                           "--allowance-file", tmp_path / "allowance", "--epochs", EPOCHS,
                           "--dataset", DATASET),
        min_members=1, max_members=size, cpus=1, cwd=str(REPO), env={"ELASTIC_TEST_MARK": mark},
        agent_args=("--global-batch-size", "10", "--max-micro-batch", "4",
                    "--rdzv-conf", "last_call_timeout=0.5,join_settle=0.3,lease_ttl=60",
                    "--log-dir", str(tmp_path / "logs")))


def trained_once_per_epoch(records):
    """Asserts every step was kept once and every sample trained once per epoch; returns the
    steps trained in more than one round (step -> rounds)."""
    steps, attempts = surviving_steps(records)
    assert sorted(steps) == list(range(1, EPOCHS * DATASET // 10 + 1))
    trained = {s: exactly_what_was_trained(s, recs) for s, recs in steps.items()}
    for epoch in range(EPOCHS):
        used = [i for e, batch in trained.values() if e == epoch for i in batch]
        assert sorted(used) == list(range(DATASET)), f"epoch {epoch}"
    return {s: sorted({r["round"] for r in recs}) for s, recs in attempts.items()
            if len({r["round"] for r in recs}) > 1}


def test_an_elastic_job_gives_nodes_to_a_gang_and_takes_them_back(cluster, pool_etcd, tmp_path):
    from integrations.ray.client import PoolClient
    c, nodes = cluster
    mark = new_mark()
    (tmp_path / "records").mkdir()
    (tmp_path / "gang").mkdir()
    (tmp_path / "gang.py").write_text(GANG_SCRIPT)
    queues = tmp_path / "queues.yaml"
    queues.write_text("priorityClasses:\n  - {name: high, value: 1000}\n"
                      "  - {name: training, value: 200}\n  - {name: batch, value: 100}\n")
    pacer = Pacer(tmp_path / "allowance")
    ctl = ControllerProcess(c.address, pool_etcd, tmp_path, queues)
    try:
        with PoolClient(pool_etcd) as pool:
            pool.submit(trainer(tmp_path, mark, 3))
        # 1. the job grows into every idle node, and trains there
        wait_for(lambda: trained_at(tmp_path, 3), 120, what="trainer training at 3")
        assert len(status(pool_etcd, "trainer")["members"]) == 3

        # 2. a higher-priority gang: the job releases two members at a step boundary
        submitted = time.time()
        out = pool_command(pool_etcd, "submit", "gang", "--name", "g1", "--members", 2,
                           "--priority", "high", "--env", f"ELASTIC_TEST_MARK={mark}", "--json",
                           "--", tmp_path / "gang.py", tmp_path / "gang", 3)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"name": "g1", "kind": "gang"}
        wait_for(lambda: len(list((tmp_path / "gang").glob("rank*.json"))) == 2, 120,
                 what="both gang members running")
        ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "gang").glob("*.json"))]
        assert [r["env"]["RANK"] for r in ranks] == ["0", "1"]
        assert {r["env"]["WORLD_SIZE"] for r in ranks} == {"2"}
        assert len({(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in ranks}) == 1
        assert [r["sum"] for r in ranks] == [3.0, 3.0]  # one all-reduce over both members
        print(f"gang running {max(r['time'] for r in ranks) - submitted:.1f} s after submission")
        assert active_world(pool_etcd, "trainer") == 1
        released = [e for e in read_events(tmp_path / "logs")
                    if e["event"] == "node_left" and e["cause"] == "released" and "outcome" in e]
        assert len(released) == 2
        assert {e["outcome"] for e in released} == {"left at a step boundary"}

        shrunk = rounds(tmp_path)

        # 3. the gang ends; the job grows back
        wait_for(lambda: status(pool_etcd, "g1")["state"] == "finished", 60, what="gang done")
        g1 = status(pool_etcd, "g1")
        assert g1["exit_code"] == 0
        try:
            wait_for(lambda: trained_at(tmp_path, 3, after=shrunk), 120,
                     what="trainer training at 3 again")
        except AssertionError as exc:  # what the pool and the job did, for whoever reads CI
            events = [f"{e.get('event')} {e.get('cause', '')} {e.get('world_size', '')}"
                      for e in read_events(tmp_path / "logs")][-20:]
            raise AssertionError(f"{exc}; status {status(pool_etcd, 'trainer')}; last events "
                                 f"{events}; controller said: "
                                 f"{ctl.out.read_text()[-3000:]}") from None
        logs = pool_command(pool_etcd, "logs", "g1", "--member", "1")
        assert logs.returncode == 0 and "GANG" in logs.stdout and '"RANK": "1"' in logs.stdout

        # 4. the controller dies; a new one carries on with what it finds
        ctl.kill()
        ctl.start()
        wait_for(lambda: any("controller restarted: 3 member(s) found running" in h
                             for h in status(pool_etcd, "trainer")["history"]), 30,
                 what="the restarted controller to take the members back")
        assert active_world(pool_etcd, "trainer") == 3

        # 5. a node is removed without grace: the job trains on with the rest
        with JobClient(pool_etcd) as jobs:
            round_before = jobs.status("trainer", probe=False, recent=0).round.number
        victim = next(n for n in nodes if n.node_id in
                      {m["node"] for m in status(pool_etcd, "trainer")["members"]})
        c.remove_node(victim, allow_graceful=False)
        wait_for(lambda: active_world(pool_etcd, "trainer") == 2, 60, what="trainer at 2")
        wait_for(lambda: len(status(pool_etcd, "trainer")["members"]) == 2, 30,
                 what="the controller to drop the lost member")
        pacer.finish()
        wait_for(lambda: status(pool_etcd, "trainer")["state"] != "running", 180,
                 what="the job to end")
        final = status(pool_etcd, "trainer")
        assert final["state"] == "finished", final
    finally:
        pacer.finish()
        ctl.stop()
        clear_pool()
    # every sample exactly once per epoch; no step recomputed but those the dead node had
    # trained since the last commit
    recomputed = trained_once_per_epoch(tmp_path / "records")
    assert all(rounds[0] >= round_before for rounds in recomputed.values()), recomputed
    wait_for(lambda: processes_with_mark(mark) == [], 30, what="no process left behind")


QUEUES = """
resourceFlavors: [{name: default}]
clusterQueues:
  - name: default
    flavors: [{name: default, resources: {cpu: {nominalQuota: 100}}}]
  - name: tiny
    flavors: [{name: default, resources: {cpu: {nominalQuota: 1}}}]
nodeTypes:
  - {name: small, cpu: 1, memory: 1Gi, min: 0, max: 2}
timeouts: {nodeIdleSeconds: 2}
"""


def test_nodes_are_requested_for_a_gang_that_cannot_fit_and_released_when_idle(
        cluster, pool_etcd, tmp_path):
    from integrations.ray.client import PoolClient
    from integrations.ray.controller import Controller
    from integrations.ray.providers import LocalClusterProvider
    from integrations.ray.scheduler import SubmissionError
    from integrations.ray.spec import GANG, Submission
    c, _ = cluster
    workers = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1)
    provider = LocalClusterProvider(c)
    ctl = Controller(pool_etcd, QUEUES, provider=provider, tick_s=0.3,
                     log_dir=str(tmp_path / "members")).start()

    def ticking(predicate):  # the controller steps in this (main) thread: Ray adds nodes only here
        def check():
            ctl.tick()
            return predicate()
        return check

    try:
        with PoolClient(pool_etcd) as pool:
            # a bad spec is refused at submission with the core's message; nothing is written
            with pytest.raises(SubmissionError, match="unknown queue 'nope'; known queues: "
                                                      "default, tiny"):
                pool.submit(Submission("bad", GANG, ("true",), queue="nope"))
            out = pool_command(pool_etcd, "submit", "gang", "--members", 1, "--cpus", 64,
                               "--", "true")
            assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
            assert "no node or node type" in out.stderr
            assert pool.list() == []

            # one queue's limit: a gang over the quota waits, and says why
            pool.submit(Submission("over", GANG, ("true",), queue="tiny", min_members=2,
                                   max_members=2))
            wait_for(ticking(lambda: "quota" in pool.status("over")["reason"]), 30,
                     what="a quota reason")
            assert pool.status("over")["state"] == "pending"
            queues = {q["queue"]: q for q in pool.queues()}
            assert queues["tiny"]["pending"] == 1 and queues["tiny"]["quota"] == {
                "default": {"cpu": 1.0}}
            pool.stop("over")
            wait_for(ticking(lambda: pool.status("over")["state"] == "stopped"), 30,
                     what="stopped")

            # a gang larger than the pool: nodes are requested, it runs, they go back
            members = workers + 2
            pool.submit(Submission("wide", GANG, (sys.executable, "-c", "print('ok')"),
                                   min_members=members, max_members=members, cwd=str(tmp_path)))
            wait_for(ticking(lambda: pool.status("wide")["state"] == "finished"), 120,
                     what="the gang to run on requested nodes")
            assert provider.added == 2
            small = {n["NodeID"] for n in ray.nodes() if n["Alive"]
                     and (n.get("Labels") or {}).get("node-type") == "small"}
            ran_on = {m["node"] for m in pool.status("wide")["members"]}  # kept after the end
            assert len(ran_on) == members and len(small) == 2 and small <= ran_on
            assert all(text.strip() == "ok" for text in pool.logs("wide").values())
            assert len(pool.logs("wide")) == members
            wait_for(ticking(lambda: provider.removed == 2), 60, what="idle nodes released")

            # code shipped with Ray's runtime_env: the members run in a copy of the directory
            code = tmp_path / "code"
            code.mkdir()
            (code / "hello.py").write_text("import os\nprint(open('data.txt').read(), "
                                           "os.getcwd() != %r)\n" % str(code))
            (code / "data.txt").write_text("shipped")
            pool.submit(Submission("shipped", GANG, ("hello.py",), min_members=1,
                                   max_members=1, working_dir=str(code)))
            wait_for(ticking(lambda: pool.status("shipped")["state"] in ("finished", "failed")),
                     120, what="the shipped gang")
            assert list(pool.logs("shipped").values()) == ["shipped True\n"], pool.logs("shipped")
            wait_for(lambda: sum(1 for n in ray.nodes() if n["Alive"]
                                 and n["Resources"].get("CPU", 0) >= 1) == workers, 30,
                     what="the pool back at its size")
    finally:
        ctl.close()
        clear_pool()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Serve keeps the HTTP port of its first start for the cluster's life: every test's endpoint
# is deployed on this one.
SERVE_PORT = free_port()


def call(url, work_s, timeout=60):
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps({"inputs": [[0.1] * 8],
                                                      "work_s": work_s}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_an_endpoint_borrows_a_node_from_training_under_load_and_gives_it_back(
        cluster, pool_etcd, tmp_path):
    """The pool is full of training; a load step on a scaled-to-zero endpoint takes a node from
    the job (released at a step boundary), and after the load the endpoint scales to zero and
    the job grows back onto it. No request fails and no committed step is lost."""
    from integrations.ray.client import PoolClient
    from serving import endpoint
    from serving.spec import EndpointSpec
    c, _ = cluster
    size = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1)
    mark = new_mark()
    (tmp_path / "records").mkdir()
    pacer = Pacer(tmp_path / "allowance")
    ctl = ControllerProcess(c.address, pool_etcd, tmp_path)
    deployed = False
    try:
        with PoolClient(pool_etcd) as pool:
            pool.submit(trainer(tmp_path, mark, size))
        wait_for(lambda: trained_at(tmp_path, size), 120, what=f"trainer training at {size}")
        full = rounds(tmp_path)

        spec = EndpointSpec("ep", "examples.serve_model:Model", min_replicas=0, max_replicas=1,
                            target_concurrency=2, cpus=1, idle_s=4, stable_window_s=4,
                            panic_window_s=1, pool=pool_etcd)
        url = endpoint.deploy(spec, http_port=SERVE_PORT, path=str(REPO))
        deployed = True
        wait_for(lambda: status(pool_etcd, "ep")["reason"] == "scaled to zero", 30,
                 what="the endpoint registered at zero replicas")
        assert active_world(pool_etcd, "trainer") == size  # an idle endpoint takes nothing

        # a load step: the first requests wait for the node the job gives up
        answers, failures = [], []

        def client():
            for _ in range(4):
                try:
                    answers.append(call(url, 0.5))
                except OSError as exc:
                    failures.append(repr(exc))

        started = time.time()
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(status(pool_etcd, "ep")["members"]) == 1, 60,
                 what="the endpoint granted a node")
        wait_for(lambda: active_world(pool_etcd, "trainer") == size - 1, 60,
                 what="the job one node smaller")
        for t in threads:
            t.join(120)
        print(f"12 requests answered {time.time() - started:.1f} s after the load step")
        assert failures == [] and len(answers) == 12 and all(a["outputs"] for a in answers)
        granted = status(pool_etcd, "ep")["members"][0]["node"]
        trainer_nodes = {m["node"] for m in status(pool_etcd, "trainer")["members"]}
        assert granted not in trainer_nodes
        assert endpoint.status("ep")["pool"]["granted"] == 1
        released = [e for e in read_events(tmp_path / "logs")
                    if e["event"] == "node_left" and e["cause"] == "released" and "outcome" in e]
        assert [e["outcome"] for e in released] == ["left at a step boundary"]
        shrunk = rounds(tmp_path)
        assert shrunk > full

        # after the load: scaled to zero, and the job grows back onto the node
        wait_for(lambda: status(pool_etcd, "ep")["reason"] == "scaled to zero", 60,
                 what="the endpoint back at zero")
        wait_for(lambda: trained_at(tmp_path, size, after=shrunk), 120,
                 what=f"trainer training at {size} again")
        endpoint.delete("ep")
        deployed = False
        assert "ep" not in {w["name"] for w in PoolClient(pool_etcd).list()}
        pacer.finish()
        wait_for(lambda: status(pool_etcd, "trainer")["state"] != "running", 180,
                 what="the job to end")
        assert status(pool_etcd, "trainer")["state"] == "finished"
    finally:
        pacer.finish()
        if deployed:
            from ray import serve
            serve.delete("ep")
        ctl.stop()
        clear_pool()
    # every sample exactly once per epoch, and nothing trained twice: the node left at a step
    # boundary
    assert trained_once_per_epoch(tmp_path / "records") == {}
    wait_for(lambda: processes_with_mark(mark) == [], 30, what="no process left behind")


def test_the_dashboard_and_the_metrics_show_a_queue_and_an_endpoint(cluster, pool_etcd,
                                                                    tmp_path):
    """A pending gang (over its queue's quota) and an endpoint answering requests: the
    controller's /metrics and the dashboard's page (headless Chromium) show both."""
    from selenium.webdriver.support.ui import WebDriverWait

    from integrations.ray.client import PoolClient
    from integrations.ray.spec import GANG, Submission
    from launcher.metrics import sample
    from serving import endpoint
    from serving.spec import EndpointSpec

    from .test_observability import DashboardProcess, browser, page
    c, _ = cluster
    driver = browser()  # skips, saying what to install, before anything starts
    queues = tmp_path / "queues.yaml"
    queues.write_text(QUEUES)
    ctl = ControllerProcess(c.address, pool_etcd, tmp_path, queues, ("--metrics-port", "0"))
    metrics_url = next(line.split()[-1] for line in ctl.out.read_text().splitlines()
                       if line.startswith("controller: metrics at "))
    dashboard = None
    deployed = False
    try:
        with PoolClient(pool_etcd) as pool:
            pool.submit(Submission("over", GANG, ("true",), queue="tiny", min_members=2,
                                   max_members=2))
            wait_for(lambda: "quota" in pool.status("over")["reason"], 30, what="quota reason")
        spec = EndpointSpec("ep", "examples.serve_model:Model", min_replicas=1, max_replicas=1,
                            cpus=1, pool=pool_etcd)
        url = endpoint.deploy(spec, http_port=SERVE_PORT, path=str(REPO))
        deployed = True
        for _ in range(5):
            assert call(url, 0.02)["outputs"]

        def scrape():
            import urllib.request
            with urllib.request.urlopen(metrics_url, timeout=10) as r:
                return r.read().decode()
        wait_for(lambda: (sample(scrape(), "elastic_endpoint_requests_total",
                                 {"endpoint": "ep", "outcome": "ok"}) or 0) >= 5, 30,
                 what="the endpoint's requests in the controller's metrics")
        text = scrape()
        assert sample(text, "elastic_pool_queue_pending_workloads", {"queue": "tiny"}) == 1
        assert sample(text, "elastic_endpoint_replicas", {"endpoint": "ep",
                                                          "state": "running"}) == 1
        assert sample(text, "elastic_endpoint_replicas_granted", {"endpoint": "ep"}) == 1
        assert sample(text, "elastic_endpoint_request_duration_seconds_count",
                      {"endpoint": "ep"}) >= 5
        assert sample(text, "elastic_pool_allocated", {"resource": "cpu"}) == 1.0
        assert sample(text, "elastic_pool_decisions_total", {"decision": "admit"}) >= 1

        dashboard = DashboardProcess(tmp_path, "--rdzv-endpoint", pool_etcd, "--ray-address",
                                     c.address)
        driver.get(dashboard.url)
        state = """
        const rows = sel => Array.from(document.querySelectorAll(sel));
        return {queues: Object.fromEntries(rows("#queues tr.queue").map(
                    r => [r.dataset.queue, r.textContent])),
                endpoints: Object.fromEntries(rows("#endpoints tr.endpoint").map(
                    r => [r.dataset.endpoint, Array.from(r.cells).map(c => c.textContent)])),
                cpu: rows("#allocation .alloc").filter(a => a.dataset.resource === "cpu")
                    .map(a => a.textContent)};
        """

        def shown(d):
            s = d.execute_script(state)
            ep = s["endpoints"].get("ep")
            ok = ("over" in s["queues"].get("tiny", "") and "quota" in s["queues"]["tiny"]
                  and ep is not None and ep[2].startswith("1 running") and ep[6] != "-")
            return s if ok else None
        s = WebDriverWait(driver, 60, poll_frequency=0.3).until(shown)
        name, state_text, replicas, granted, rate, p50, p95, total = s["endpoints"]["ep"]
        assert granted == "1 / 1" and p95.endswith(" ms") and int(total) >= 5
        cpus = sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
        assert f"1 of {cpus:g} allocated" in s["cpu"][0]  # earlier tests may leave fewer nodes
        assert page(driver)["errors"] == []
    finally:
        driver.quit()
        if dashboard is not None:
            dashboard.stop()
        if deployed:
            endpoint.delete("ep")
        ctl.stop()
        clear_pool()
