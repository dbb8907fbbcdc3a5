"""What observability costs: the agent loop's iteration time with and without a 10 Hz scrape of
its /metrics, and the dashboard's load time with 100 jobs in etcd.

    python benchmarks/observability.py [--reps 6] [--window 15] [--jobs 100] [--loads 10]

1. Agent loop. One agent (`elastic.run`'s own code path, in this process, on the main thread,
   with its embedded etcd) runs a one-node job whose worker only sleeps; each pass of its loop
   (`Membership.step()` + `_pass()`, what it does every --monitor-interval 0.05 s and on every
   etcd event) is timed inside the process. Windows of --window seconds alternate without and
   with a scraper (a process of its own, as Prometheus is) that GETs /metrics ten times a
   second over a kept connection (A B B A A B ...: each mode leads equally often), --reps
   windows of each. Reported: the pooled p50, p95 and p99 pass time of each mode, their ratio
   (target: p99 within 1%), the spread of the per-window p99s, and what a scrape costs.
2. Dashboard. --jobs jobs written into a fresh etcd through the agents' own store calls
   (spec, two registered nodes under a lease, a leader, a round, five events each), then
   `python -m elastic.dashboard` as its own process. A page load from outside: GET / and
   /app.js, then what the page asks for first (/api/jobs, /api/jobs/<job>, /api/pool), timed
   end to end over one connection, --loads times (after one load to warm up). With Chromium
   (Debian's chromium and chromium-driver, Selenium): from navigation to the jobs table holding
   every job and the selected job's members drawn. Target: under 1 s.

Everything runs on 127.0.0.1 and every process it starts is ended by it. Absolute times are
this machine's (say which, next to them); the ratio of the two loop modes is what travels.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRAPE_HZ = 10.0
MONITOR_INTERVAL = "0.05"
SLEEPER = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.2)\n"


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# -- 1. the agent loop ---------------------------------------------------------------------------
class LoopTimer:
    """Times each pass of the agent's loop (step + decisions) into the current mode's list."""

    def __init__(self):
        self.mode = None  # None: warm-up, not recorded
        self.passes = {"off": [], "on": []}
        self.windows = {"off": [], "on": []}
        self.agent = None
        self._t0 = 0.0

    def install(self):
        from launcher import agent as agent_mod
        from rendezvous.membership import Membership
        step, one_pass = Membership.step, agent_mod.ElasticAgent._pass
        timer = self

        def timed_step(membership):
            timer._t0 = time.perf_counter()
            return step(membership)

        def timed_pass(agent, snap):
            timer.agent = agent
            try:
                return one_pass(agent, snap)
            finally:
                took = time.perf_counter() - timer._t0
                if timer.mode is not None:
                    timer.passes[timer.mode].append(took)
                    timer.windows[timer.mode][-1].append(took)
        Membership.step = timed_step
        agent_mod.ElasticAgent._pass = timed_pass


# Prometheus scrapes from its own process: so does this scraper (in the agent's process its
# own HTTP client would take the GIL from the loop it measures).
SCRAPER = """
import http.client, json, signal, sys, threading, time
host, port = sys.argv[1].rsplit(":", 1)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
conn = http.client.HTTPConnection(host, int(port), timeout=5)
took, size, period = [], 0, 1.0 / float(sys.argv[2])
next_at = time.perf_counter()
while not stop.is_set():
    t0 = time.perf_counter()
    conn.request("GET", "/metrics")
    size = len(conn.getresponse().read())
    took.append(time.perf_counter() - t0)
    next_at += period
    stop.wait(max(0.0, next_at - time.perf_counter()))
print(json.dumps({"took": took, "size": size}), flush=True)
"""


class Scraper:
    """GET /metrics at SCRAPE_HZ over one kept connection, from a process of its own."""

    def __init__(self, addr):
        self.proc = subprocess.Popen([sys.executable, "-c", SCRAPER, addr, str(SCRAPE_HZ)],
                                     stdout=subprocess.PIPE, text=True)
        self.took, self.size = [], 0

    def stop(self):
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        data = json.loads(out.strip().splitlines()[-1])
        self.took, self.size = data["took"], data["size"]


def agent_loop(reps: int, window: float):
    from elastic.cli import parse_args
    from elastic.run import run

    tmp = Path(tempfile.mkdtemp(prefix="obs-agent-"))
    stop = tmp / "stop"
    script = tmp / "sleeper.py"
    script.write_text(SLEEPER)
    timer = LoopTimer()
    timer.install()
    scrapes = []
    result = {}

    def drive():
        try:
            deadline = time.time() + 120
            while timer.agent is None or not timer.agent.state.rounds_started:
                if time.time() > deadline:
                    raise RuntimeError("the agent did not start its worker in 120 s")
                time.sleep(0.1)
            time.sleep(3.0)  # warm-up: the first round's work is done
            addr = timer.agent._health.addr
            for rep in range(reps):
                for mode in (("off", "on") if rep % 2 == 0 else ("on", "off")):
                    timer.windows[mode].append([])
                    scraper = Scraper(addr) if mode == "on" else None
                    time.sleep(1.0)  # its interpreter starting is no part of the window
                    timer.mode = mode
                    time.sleep(window)
                    timer.mode = None
                    if scraper is not None:
                        scraper.stop()
                        scrapes.append(scraper)
            result["addr"] = addr
        except BaseException as exc:  # reported after the agent ended
            result["error"] = exc
        finally:
            stop.touch()

    threading.Thread(target=drive, daemon=True).start()
    config = parse_args(["--nnodes", "1", "--nproc-per-node", "1", "--preload", "none",
                         "--monitor-interval", MONITOR_INTERVAL, "--rdzv-id", "obs-bench",
                         str(script), str(stop)])
    code = run(config)  # the main thread: the agent installs its signal handlers
    shutil.rmtree(tmp, ignore_errors=True)
    if "error" in result:
        raise result["error"]
    if code != 0:
        raise RuntimeError(f"the benchmark's job ended with exit code {code}")
    took = [t for s in scrapes for t in s.took]
    return timer, took, (scrapes[-1].size if scrapes else 0)


# -- 2. the dashboard ------------------------------------------------------------------------------
def write_jobs(endpoint: str, count: int):
    """`count` running jobs of two nodes each, written with the agents' own store calls."""
    from rendezvous.api import JobSpec, Member, NodeInfo, Round
    from rendezvous.connect import connect
    from rendezvous.store import EtcdStore

    client = connect(endpoint)
    now = time.time()
    names = []
    for i in range(count):
        job = f"bench-{i:03d}"
        store = EtcdStore.attach(client, endpoint, job)
        store.ensure_spec(JobSpec(min_nodes=1, max_nodes=4, created_at=now + i * 1e-3,
                                  agreed={"nproc_per_node": 2, "backend": "torch",
                                          "batch_policy": None}))
        lease = store.grant_lease(600)
        nodes = [NodeInfo(f"host{i}-{n}", f"10.0.{i // 250}.{n + 1}", 2, f"127.0.0.1:{40000 + n}",
                          lease, now) for n in range(2)]
        for info in nodes:
            store.register(info)
        store.campaign(nodes[0].node_id, lease)
        members = tuple(Member(x.node_id, x.host, x.nproc) for x in nodes)
        store.publish_round(Round(1, members[:1], cause="start", cause_time=now), 0,
                            nodes[0].node_id)
        rnd = Round(2, members, cause="node_joined", cause_time=now + 1)
        for info in nodes:
            for seq, (event, number, world, cause) in enumerate([
                    ("joined", None, None, "start"), ("rendezvous", 1, 2, "start"),
                    ("rescale", 2, 4, "node_joined"), ("waiting", 2, 4, "node_joined"),
                    ("rescale", 2, 4, "node_joined")]):
                store.put_event(info.node_id, seq, json.dumps({
                    "time": now + seq, "event": event, "node": info.node_id, "round": number,
                    "world_size": world, "members": list(rnd.node_ids), "cause": cause}))
        # the round as the leader publishes it: compared with the revision it read
        store.publish_round(rnd, store.snapshot().round_revision, nodes[0].node_id)
        names.append(job)
    client.close()
    return names


class DashboardProcess:
    def __init__(self, endpoint: str, tmp: Path):
        self.out = tmp / "dashboard.out"
        with open(self.out, "wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "elastic.dashboard", "--rdzv-endpoint", endpoint,
                 "--port", "0"], stdout=sink, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.time() + 60
        while time.time() < deadline:
            lines = [x for x in self.out.read_text().splitlines() if x.startswith("dashboard at")]
            if lines:
                self.url = lines[0].split()[2]
                return
            time.sleep(0.05)
        raise RuntimeError(f"the dashboard did not start:\n{self.out.read_text()[-2000:]}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


def api_load(url: str, job: str) -> float:
    """One page load as the page makes it: the page, its script, its first three API calls."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    t0 = time.perf_counter()
    for path in ("/", "/app.js", "/api/jobs", f"/api/jobs/{job}", "/api/pool"):
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {body[:300]!r}")
        if path == "/api/jobs" and len(json.loads(body)["jobs"]) < 1:
            raise RuntimeError("no jobs in /api/jobs")
    took = time.perf_counter() - t0
    conn.close()
    return took


def browser_loads(url: str, jobs: int, loads: int):
    """Navigation -> every job's row and the first job's members drawn, in headless Chromium;
    None without Chromium or Selenium."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        return None
    if not (shutil.which("/usr/bin/chromium") and shutil.which("/usr/bin/chromedriver")):
        return None
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    ready = ("return document.querySelectorAll('#jobs tr.job').length >= arguments[0] && "
             "document.querySelectorAll('#members tr.member').length > 0")
    out = []
    try:
        for i in range(loads + 1):
            driver.get("about:blank")
            t0 = time.perf_counter()
            driver.get(url)
            WebDriverWait(driver, 30, poll_frequency=0.01).until(
                lambda d: d.execute_script(ready, jobs))
            if i:  # the first load warms Chromium's caches
                out.append(time.perf_counter() - t0)
    finally:
        driver.quit()
    return out


def dashboard_load(jobs: int, loads: int):
    from rendezvous.embedded import EmbeddedEtcd
    tmp = Path(tempfile.mkdtemp(prefix="obs-dash-"))
    with EmbeddedEtcd() as etcd:
        t0 = time.perf_counter()
        names = write_jobs(etcd.endpoint, jobs)
        written = time.perf_counter() - t0
        dash = DashboardProcess(etcd.endpoint, tmp)
        try:
            cold = api_load(dash.url, names[0])
            warm = [api_load(dash.url, names[0]) for _ in range(loads)]
            browser = browser_loads(dash.url, jobs, loads)
        finally:
            dash.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    return written, cold, warm, browser


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=6, help="windows of each mode")
    p.add_argument("--window", type=float, default=15.0, help="seconds per window")
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--loads", type=int, default=10)
    p.add_argument("--skip-agent", action="store_true")
    args = p.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {os.cpu_count()} cores, CPU only; python {sys.version.split()[0]}")
    summary = []
    if not args.skip_agent:
        timer, scrape_took, size = agent_loop(args.reps, args.window)
        print(f"\nagent loop: {args.reps} windows of {args.window:g} s per mode, alternated; "
              f"--monitor-interval {MONITOR_INTERVAL}")
        print(f"{'mode':<22}{'passes':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"
              f"{'window p99s ms':>28}")
        p99 = {}
        for mode, label in (("off", "no scrape"), ("on", f"scrape at {SCRAPE_HZ:g} Hz")):
            passes = timer.passes[mode]
            p99[mode] = pct(passes, 0.99)
            per_window = [pct(w, 0.99) * 1e3 for w in timer.windows[mode] if w]
            print(f"{label:<22}{len(passes):>8}{pct(passes, 0.5) * 1e3:>10.3f}"
                  f"{pct(passes, 0.95) * 1e3:>10.3f}{p99[mode] * 1e3:>10.3f}"
                  f"{min(per_window):>12.3f} .. {max(per_window):.3f} (med "
                  f"{statistics.median(per_window):.3f})")
        ratio = p99["on"] / p99["off"]
        print(f"a scrape: {len(scrape_took)} taken, p50 {pct(scrape_took, 0.5) * 1e3:.2f} ms, "
              f"p99 {pct(scrape_took, 0.99) * 1e3:.2f} ms, {size} bytes")
        summary.append(f"agent loop p99 {p99['off'] * 1e3:.3f} ms -> {p99['on'] * 1e3:.3f} ms "
                       f"with a 10 Hz scrape (x{ratio:.3f}; target within 1%)")
    written, cold, warm, browser = dashboard_load(args.jobs, args.loads)
    print(f"\ndashboard: {args.jobs} jobs written in {written:.1f} s; page + first API calls "
          f"(from outside, one connection)")
    print(f"  first load {cold * 1e3:.0f} ms; then {len(warm)} loads: median "
          f"{statistics.median(warm) * 1e3:.0f} ms, max {max(warm) * 1e3:.0f} ms")
    line = f"dashboard load with {args.jobs} jobs: median {statistics.median(warm) * 1e3:.0f} ms"
    if browser:
        print(f"  headless Chromium, navigation -> {args.jobs} rows and the members drawn: "
              f"median {statistics.median(browser) * 1e3:.0f} ms, max "
              f"{max(browser) * 1e3:.0f} ms ({len(browser)} loads)")
        line += f" (API), {statistics.median(browser) * 1e3:.0f} ms (Chromium)"
    else:
        print("  (no Chromium/Selenium: the browser figure is left out)")
    summary.append(line + " (target < 1 s)")
    print("\nsummary: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
