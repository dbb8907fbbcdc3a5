"""Metrics and the dashboard against real agents and a real etcd: a scrape of each agent's
/metrics during a job follows the world size through a join and a SIGKILL, found through
`python -m elastic.job targets --json`; the dashboard's page, in headless Chromium, shows the
job's members and, after a node is killed, the new world size and its cause."""
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from launcher.metrics import sample

from .agents import REPO, Agent, new_mark, processes_with_mark, wait_for

pytestmark = pytest.mark.integration

ALLREDUCE = REPO / "tests" / "integration" / "scripts" / "allreduce_loop.py"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def job_command(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "elastic.job", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def scrape(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        return r.read().decode()


class TwoNodeJob:
    """An in-place job of up to two one-worker nodes: `a` first, then `b` joins it."""

    def __init__(self, tmp_path, etcd_endpoint, run_id):
        self.tmp, self.endpoint, self.run_id = tmp_path, etcd_endpoint, run_id
        self.mark, self.stop_file = new_mark(), tmp_path / "stop"
        self.args = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_endpoint,
                     "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
                     "--log-dir", tmp_path / "logs", ALLREDUCE, "--stop-file", self.stop_file]
        self.agents = []

    def start(self, name):
        agent = Agent(self.args, self.tmp, name, self.mark)
        self.agents.append(agent)
        return agent

    def targets(self):
        """{node id: health address} from the service discovery command."""
        done = job_command("targets", self.run_id, "--json", "--rdzv-endpoint", self.endpoint)
        assert done.returncode == 0, done.stderr
        groups = json.loads(done.stdout)
        assert all(g["labels"]["job"] == self.run_id for g in groups)
        return {g["labels"]["node_id"]: g["targets"][0] for g in groups}

    def node_of(self, agent):
        return next(n for n in self.targets() if f"-{agent.proc.pid}-" in n)

    def finish(self):
        self.stop_file.touch()
        for agent in self.agents:
            if agent.proc.poll() is None:
                try:
                    agent.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            agent.stop()
        wait_for(lambda: processes_with_mark(self.mark) == [], 30, what="no process left")


@pytest.fixture
def two_node_job(tmp_path, etcd_endpoint, run_id):
    job = TwoNodeJob(tmp_path, etcd_endpoint, run_id)
    yield job
    job.finish()


def test_a_scrape_follows_the_world_size_through_a_join_and_a_sigkill(two_node_job):
    job = two_node_job
    a = job.start("a")
    wait_for(lambda: "world=1 rank=0" in a.output(), 90, what="a training alone")
    b = job.start("b")
    wait_for(lambda: "world=2 rank=1" in b.output(), 90, what="b in the world of two")
    targets = job.targets()
    assert len(targets) == 2
    addr_a, addr_b = targets[job.node_of(a)], targets[job.node_of(b)]
    for addr in (addr_a, addr_b):
        wait_for(lambda: sample(scrape(addr), "elastic_world_size") == 2, 30,
                 what=f"world size 2 at {addr}")
    joined = scrape(addr_a)
    assert sample(joined, "elastic_rescale_duration_seconds_count", {"cause": "node_joined"}) == 1
    assert sample(joined, "elastic_agent_info", {"run_id": job.run_id}) == 1

    b.kill_node()
    wait_for(lambda: sample(scrape(addr_a), "elastic_world_size") == 1, 60,
             what="world size 1 on the survivor")
    after = scrape(addr_a)
    counts = {cause: sample(after, "elastic_rescale_duration_seconds_count", {"cause": cause})
              for cause in ("node_joined", "node_left")}
    assert counts == {"node_joined": 1, "node_left": 1}, after
    assert sample(after, "elastic_rescale_duration_seconds_sum", {"cause": "node_left"}) > 0
    assert sample(after, "elastic_rounds_total", {"cause": "start"}) == 1
    assert sample(after, "elastic_worker_restarts_total") == 0  # in place: no process restarted
    # the in-place channel's step counters (Progress is sent every 0.5 s)
    wait_for(lambda: (sample(scrape(addr_a), "elastic_steps_committed_total") or 0) >= 10, 60,
             what="committed steps reported")
    assert sample(scrape(addr_a), "elastic_steps_total") >= 10
    assert set(job.targets()) == {job.node_of(a)}  # the dead node's target is gone


def test_targets_without_a_job_lists_every_jobs_agents_and_bad_input_is_one_line(
        two_node_job, etcd_endpoint):
    a = two_node_job.start("a")
    wait_for(lambda: "world=1 rank=0" in a.output(), 90, what="a training")
    from rendezvous.client import JobClient
    with JobClient(etcd_endpoint) as client:  # one read of etcd, as one status per job
        assert client.statuses() == [client.status(j, probe=False, recent=0)
                                     for j in client.jobs()]
    done = job_command("targets", "--rdzv-endpoint", etcd_endpoint)
    assert done.returncode == 0 and two_node_job.run_id in done.stdout and "/metrics" in \
        done.stdout
    done = job_command("targets", "--json", "--rdzv-endpoint", "127.0.0.1:1", "--timeout", "1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "127.0.0.1:1" in done.stderr


def browser():
    """Headless Chromium through Selenium, or a skip saying what to install."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("the browser test needs Selenium: pip install 'elastic-run[test]'")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(f"the browser test needs {' and '.join(missing)}: apt-get install chromium "
                    "chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


class DashboardProcess:
    """`python -m elastic.dashboard` on a free port; `url` once it listens."""

    def __init__(self, tmp_path, *args):
        self.out = tmp_path / "dashboard.out"
        with open(self.out, "wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "elastic.dashboard", "--port", "0", *map(str, args)],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        line = wait_for(lambda: next((x for x in self.out.read_text().splitlines()
                                      if x.startswith("dashboard at ")), None), 60,
                        what="the dashboard to listen")
        self.url = line.split()[2]

    def api(self, path):
        """(HTTP status, JSON body) of an API call."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def chrome():
    driver = browser()
    yield driver
    driver.quit()


# What the page shows, read in one script (it redraws every second: elements found one call
# earlier may be gone by the next).
PAGE_STATE = """
const rows = sel => Array.from(document.querySelectorAll(sel));
const text = id => (document.getElementById(id) || {}).textContent || "";
return {world: text("world-size"), job: text("job-id"), round: text("round-cause"),
        members: Object.fromEntries(rows("#members tr.member").map(r => [r.dataset.nodeId,
                                                                          r.dataset.state])),
        timeline: rows("#timeline tr.round").map(r => [r.dataset.worldSize, r.dataset.cause,
                                                       r.textContent]),
        jobs: rows("#jobs tr.job").map(r => r.dataset.job),
        points: rows("#chart circle").length,
        errors: rows(".error").filter(e => e.offsetParent !== null).map(e => e.textContent)};
"""


def page(driver):
    return driver.execute_script(PAGE_STATE)


def test_the_page_shows_the_members_and_after_a_kill_the_new_world_size_and_its_cause(
        two_node_job, chrome, tmp_path, etcd_endpoint):
    from selenium.webdriver.support.ui import WebDriverWait

    job = two_node_job
    a = job.start("a")
    wait_for(lambda: "world=1 rank=0" in a.output(), 90, what="a training alone")
    b = job.start("b")
    wait_for(lambda: "world=2 rank=1" in b.output(), 90, what="b in the world of two")
    node_a, node_b = job.node_of(a), job.node_of(b)
    dashboard = DashboardProcess(tmp_path, "--rdzv-endpoint", etcd_endpoint)
    try:
        chrome.get(f"{dashboard.url}#job={job.run_id}")
        WebDriverWait(chrome, 30, poll_frequency=0.2).until(
            lambda d: page(d)["members"] == {node_a: "active", node_b: "active"})
        shown = page(chrome)
        assert shown["world"] == "2" and shown["job"] == job.run_id and shown["errors"] == []
        assert job.run_id in shown["jobs"]

        b.kill_node()
        WebDriverWait(chrome, 60, poll_frequency=0.2).until(
            lambda d: page(d)["world"] == "1" and page(d)["timeline"][0][:2] == ["1", "node_left"])
        shown = page(chrome)
        assert shown["members"] == {node_a: "active"}
        assert "node_left" in shown["round"]
        assert [cause for _, cause, _ in shown["timeline"]] == ["node_left", "node_joined",
                                                                "start"]
        assert node_b in shown["timeline"][0][2]  # the leader recorded which node left
        assert shown["points"] == 3
    finally:
        dashboard.stop()


def test_an_etcd_out_of_reach_is_shown_on_the_page_not_a_traceback(chrome, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    from launcher.network import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    dashboard = DashboardProcess(tmp_path, "--rdzv-endpoint", endpoint)
    try:
        code, body = dashboard.api("api/jobs")
        assert code == 503 and endpoint in body["error"] and body["jobs"] == []
        chrome.get(dashboard.url)
        errors = WebDriverWait(chrome, 30).until(lambda d: page(d)["errors"])
        assert len(errors) == 1 and endpoint in errors[0]
        assert "Traceback" not in dashboard.out.read_text()
    finally:
        dashboard.stop()
