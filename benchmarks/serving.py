"""Endpoints under load: this project's policy against Ray Serve's default autoscaling, on the
same deployment, alternating, in one run; and an endpoint borrowing nodes from training.

    python benchmarks/serving.py [--scenario step] [--reps 2] [--clients 16] [--load-s 60]
    python benchmarks/serving.py --scenario trace [--reps 2]
    python benchmarks/serving.py --scenario pool [--reps 2]

(a) step: a load step from 1 to --clients clients (below).
(b) trace: the request rate of Alibaba's GenAI serving trace (`data/genai/qps_5min.csv`, see
    data/README.md), windows 44-83 (a fall to 1/25 of the peak, then a rise to it within
    25 minutes, then the plateau), each 5-minute window replayed in 3 s (100x), the peak scaled
    to 10 requests/s of 1 s each (what 2 cores serve with room: ~10 requests at once, 3 replicas
    at 4 each), Poisson arrivals within a window, each request on its own thread (an open loop:
    users do not wait for each other), 10 s client timeout, same cluster and deployment as (a).
    Measured: p50/p99 over all requests, p99 of the "steady" requests (sent while the endpoint
    had the replicas the rate needed, and not within 10 s after a shortage), failed or timed
    out, replica-seconds, and seconds under-provisioned (running replicas x 4 < rate x 1 s).
(c) pool: a local cluster of a head without CPUs and 3 nodes of 1 CPU; ours: a 1:3 training job
    of the shared pool (examples/train_elastic.py, 50 ms steps) holding every node and a
    scale-to-zero endpoint of the pool (`--rdzv-endpoint`: 0..2 replicas of 1 CPU, 2 requests
    per replica); at full size a step from 0 to 4 clients of 1 s requests for 30 s takes two
    nodes from the job, which grows back after the load. The anchor ("partition"), what a
    platform team does today so training cannot starve an endpoint: the job at 1:2 and the
    endpoint on the third node with Serve's default policy (1..2 replicas: the second never
    finds a node). Measured: the step -> first answer and -> 2 replicas running, p99 after that
    (the partition: over the second half of the load), failed, the job's steps trained again,
    its longest pause between steps, the load's end -> training back at full size, and the
    training node-seconds (world size integrated) from 10 s before the step to 20 s after the
    load.

The cluster: `ray.cluster_utils.Cluster` on 127.0.0.1, one node of 4 logical CPUs (the machine has
2 cores). The deployment: examples/serve_model.py, each request held 1 s (`work_s`, as a bigger
model would), 0.5 CPU per replica, at most 4 requests at once per replica, 1..4 replicas. Both
aim for 4 requests per replica, so 16 clients need 4 replicas. The step is 1 -> 16 clients, not
32: on 2 cores Serve's HTTP proxy tops out near 33 requests/s (measured with 32 clients and
0.1 s requests: p50 ~900 ms for both policies, whatever the replicas), so more clients measure
the proxy, not the policy.

  ours      serving.endpoint (serving.policy as Serve's custom policy: panic window 6 s, stable
            60 s; Serve's delays 0, metrics every 0.5 s)
  default   Serve's default policy with its default settings (AutoscalingConfig(min_replicas=1,
            max_replicas=4, target_ongoing_requests=8)), as a Serve user gets it

Each run: 5 s of 1 client (the unloaded latency), then a step to --clients clients for --load-s
seconds, each client calling back to back with a 10 s timeout. Measured:
  capacity s     the step -> 4 replicas running
  p50/p99 ms     latency over the steady part: from capacity (or the step's second half when
                 capacity never came) to the end of the load
  failed         requests that failed or timed out
  replica-s      replicas running, integrated over the run

Results (`python benchmarks/serving.py --reps 2`: 2 cores, CPU only, Ray 2.60, medians of 2
alternating repetitions):

              capacity s  p50 ms  p99 ms  unloaded p99  failed  replica-s
    ours            12.1    1034    1167          1022       0        209
    default         49.9    1036    1179          1019       0         92

Ours reaches the 4 replicas 4.1x sooner, and over the 60 s of load answers 796-802 requests
against Serve's default 315-325 (the default runs 40 s short of capacity: its 30 s upscale delay
and 10 s metrics); once at capacity both hold p99 within 1.15x of the unloaded p99, no request
failed. Most of ours' 12 s is the three new replicas starting together (import torch, build the
model) on two loaded cores. `python benchmarks/serving.py --reps 1 --load-s 30` also times the
ask ("asked s": the step -> Serve told to run all 4): ours asked after 5.7 s, ran them at 11.4 s
(so ~5.7 s of replica start-up), p99 at capacity 1220 ms; Serve's default asked for none of
them within the 30 s (p50 5479 ms, all 16 clients on one replica).

(b) `python benchmarks/serving.py --scenario trace --reps 2` (medians of 2; 600 requests each):

              p50 ms  p99 ms  steady p99  failed  replica-s  under-provisioned s
    ours        1019    5122        1176       0        389                  9.7
    default     1065    9879        1154     184        212                 43.6

Serve's default policy lets 31% of the requests time out at the trace's rise (43.6 s short of
replicas); ours loses none, at 1.8x the replica-seconds. Ours' overall p99 is set by the rise
itself (the replicas it asks for take ~6-12 s to start on two cores); over the steady part (432
of ~600 requests: sent while the replicas matched the rate, not within 10 s after a shortage)
its p99 is 1176 ms, 1.15x the unloaded p99 of (a). An earlier run (the same command) gave ours
p99 3908 ms, 0 failed; default 9777 ms, 134 failed.

(c) `python benchmarks/serving.py --scenario pool --reps 2` (medians of 2):

              1st answer s  2 replicas s  p99 ms  failed  steps lost  pause s  regrow s  train node-s
    ours              10.3          15.9    1064       2           0     0.46      16.7            88
    partition          1.1         never    3631       0           0     0.43       0.0           118

The endpoint starts from zero and takes two of the job's three nodes: the job shrinks at step
boundaries (0 steps trained again, its longest pause 0.46 s, about the partition's steady
0.43 s on this loaded machine) and is back at three nodes 17 s after the load (the endpoint's
idle time of 5 s, the scale-down once Serve's replicas are gone, a new member's start-up). The
endpoint's p99 at capacity is 1.06 s against the partition's 3.6 s (its second replica never
gets a node). Costs: the cold start (10.3 s to the first answer, 7.9 and 12.7 s in the two
runs: the member's release at a step boundary, its agent's exit, the replica's start; 0 and 4
of ~100 requests passed the 10 s client timeout), and over this window the job trains fewer
node-seconds (88 vs 118) because the load is most of the window; whenever the endpoint is idle
it trains on 3 nodes instead of the partition's 2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
PORT = 18321
WORK_S = 1.0
NEEDED = 4
TARGET = 4  # requests per replica, both policies; --clients / TARGET replicas are needed


def call(url, timeout=10.0):
    body = json.dumps({"inputs": [[0.1] * 8], "work_s": WORK_S}).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()


def one_node_cluster():
    """A local Ray cluster of one node of 4 logical CPUs, connected to."""
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4,
                                                            "include_dashboard": False})
    ray.init(address=cluster.address, namespace="serving", logging_level="ERROR",
             log_to_driver=False)
    return cluster


def timed_call(url, records):
    """One request; (its start, its latency or None when it failed or timed out) to records."""
    t0 = time.time()
    try:
        call(url)
        records.append((t0, time.time() - t0))
    except (urllib.error.URLError, OSError, ValueError):
        records.append((t0, None))


class Clients:
    def __init__(self, url, n):
        self.url, self.records = url, []  # (start, latency or None)
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            timed_call(self.url, self.records)

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join(30)


def running(name):
    return states(name).get("RUNNING", 0)


def states(name):
    """Replicas of the deployment by state (STARTING, RUNNING, STOPPING, ...)."""
    from ray import serve
    app = serve.status().applications.get(name)
    dep = app.deployments.get(name) if app else None
    return {str(getattr(k, "value", k)): v for k, v in dict(dep.replica_states).items()} \
        if dep else {}


def asked(counts):
    """Replicas the policy has asked Serve for: all but those stopping."""
    return sum(v for k, v in counts.items() if k != "STOPPING")


def deploy(kind, name):
    from ray import serve
    from ray.serve.config import AutoscalingConfig

    from serving import endpoint
    from serving.spec import EndpointSpec
    spec = EndpointSpec(name, "examples.serve_model:Model", min_replicas=1, max_replicas=NEEDED,
                        target_concurrency=TARGET, max_concurrency=TARGET, max_queued=1000,
                        cpus=0.5)
    if kind == "ours":
        return endpoint.deploy(spec, http_port=PORT, path=str(REPO))
    endpoint.connect(None, PORT, spec.timeout_s)
    dep = serve.deployment(endpoint.Replica, name=name, max_ongoing_requests=TARGET,
                           max_queued_requests=1000, ray_actor_options={"num_cpus": 0.5},
                           autoscaling_config=AutoscalingConfig(
                               min_replicas=1, max_replicas=NEEDED,
                               target_ongoing_requests=TARGET))
    serve.run(dep.bind(spec.target, str(REPO), "1", TARGET), name=name, route_prefix=f"/{name}",
              blocking=False)
    return f"http://127.0.0.1:{PORT}/{name}"


def answering(url, timeout_s=60.0):
    """The endpoint's URL, once it answers."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            call(url)
            break
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    return url


def run_once(kind, rep, clients, load_s):
    from ray import serve
    name = f"{kind}{rep}"
    url = answering(deploy(kind, name))
    quiet = Clients(url, 1)
    time.sleep(5)
    quiet.stop()
    unloaded = [lat for _, lat in quiet.records if lat is not None]
    step = time.time()
    load = Clients(url, clients)
    capacity_at, asked_at, replica_s, last = None, None, 0.0, step
    while time.time() - step < load_s:
        time.sleep(0.25)
        counts = states(name)
        now, n = time.time(), counts.get("RUNNING", 0)
        replica_s += n * (now - last)
        last = now
        if asked_at is None and asked(counts) >= NEEDED:
            asked_at = now
        if capacity_at is None and n >= NEEDED:
            capacity_at = now
    load.stop()
    steady_from = capacity_at if capacity_at is not None else step + load_s / 2
    steady = sorted(lat for t, lat in load.records if lat is not None and t >= steady_from)
    failed = sum(1 for _, lat in load.records if lat is None)
    serve.delete(name)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")
    return {"capacity_s": None if capacity_at is None else capacity_at - step,
            "asked_s": None if asked_at is None else asked_at - step,
            "p50_ms": pct(steady, 0.5), "p99_ms": pct(steady, 0.99), "failed": failed,
            "replica_s": replica_s, "unloaded_p99_ms": pct(sorted(unloaded), 0.99),
            "requests": len(load.records)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=("step", "trace", "pool"), default="step")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--load-s", type=float, default=60.0)
    args = p.parse_args()
    if args.scenario == "trace":
        return main_trace(args.reps)
    if args.scenario == "pool":
        return main_pool(args.reps)
    import ray
    from ray import serve
    cluster = one_node_cluster()
    results = {"ours": [], "default": []}
    try:
        for rep in range(args.reps):
            for kind in ("ours", "default"):
                r = run_once(kind, rep, args.clients, args.load_s)
                results[kind].append(r)
                cap = "never" if r["capacity_s"] is None else f"{r['capacity_s']:.1f} s"
                ask = "never" if r["asked_s"] is None else f"{r['asked_s']:.1f} s"
                print(f"{kind:<8} rep {rep}: asked for {NEEDED} after {ask}, capacity {cap}, p50 {r['p50_ms']:.0f} ms, p99 "
                      f"{r['p99_ms']:.0f} ms (unloaded p99 {r['unloaded_p99_ms']:.0f} ms), "
                      f"failed {r['failed']} of {r['requests']}, replica-s "
                      f"{r['replica_s']:.0f}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(f"\n{'':<9}{'asked s':>8}{'capacity s':>11}{'p50 ms':>8}{'p99 ms':>8}{'unloaded p99':>14}"
          f"{'failed':>8}{'replica-s':>11}   (medians of {args.reps}; 1 -> {args.clients} "
          "clients; 2 cores, CPU only)")
    for kind, rows in results.items():
        caps = [r["capacity_s"] for r in rows if r["capacity_s"] is not None]
        med = {k: statistics.median(r[k] for r in rows)
               for k in ("p50_ms", "p99_ms", "unloaded_p99_ms", "failed", "replica_s")}
        cap = f"{statistics.median(caps):.1f}" if caps else "never"
        asks = [r["asked_s"] for r in rows if r["asked_s"] is not None]
        ask = f"{statistics.median(asks):.1f}" if asks else "never"
        print(f"{kind:<9}{ask:>8}{cap:>11}{med['p50_ms']:>8.0f}{med['p99_ms']:>8.0f}"
              f"{med['unloaded_p99_ms']:>14.0f}{med['failed']:>8.0f}{med['replica_s']:>11.0f}"
              + (f"   (capacity in {len(caps)} of {len(rows)})" if len(caps) < len(rows) else ""))
    return 0


# -- (b) a replay of the Alibaba GenAI trace's request rate ----------------------------------------

TRACE = REPO / "benchmarks" / "data" / "genai" / "qps_5min.csv"
TRACE_SLICE = (44, 84)  # 5-minute windows: a fall to ~1/20 of the peak, a sharp rise, a plateau
WINDOW_S = 3.0  # each 5-minute window replayed in 3 s: 100x compression, 120 s in all
PEAK_RPS = 10.0  # the slice's peak scaled to this: ~10 requests of 1 s at once, 3 replicas' worth


def trace_rates():
    import csv
    with open(TRACE, newline="") as f:
        qps = [float(r["qps_sum"]) for r in csv.DictReader(f)]
    part = qps[TRACE_SLICE[0]:TRACE_SLICE[1]]
    return [q * PEAK_RPS / max(part) for q in part]


class OpenLoop:
    """Requests arriving at the trace's rate (Poisson within each window), each on its own
    thread, whatever the answers: users do not wait for each other."""

    def __init__(self, url, rates, seed):
        import random
        self.url, self.rates, self.records = url, rates, []
        self.rng = random.Random(seed)
        self.threads = []
        self.start = time.time()
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.feeder.start()

    def _one(self):
        timed_call(self.url, self.records)

    def _feed(self):
        t = self.start
        for i, rate in enumerate(self.rates):
            end = self.start + (i + 1) * WINDOW_S
            while rate > 0:
                t += self.rng.expovariate(rate)
                if t >= end:
                    t = end
                    break
                time.sleep(max(0.0, t - time.time()))
                th = threading.Thread(target=self._one, daemon=True)
                th.start()
                self.threads.append(th)
            time.sleep(max(0.0, end - time.time()))
            t = max(t, end)

    def rate_at(self, now):
        i = int((now - self.start) // WINDOW_S)
        return self.rates[i] if 0 <= i < len(self.rates) else 0.0

    def join(self):
        self.feeder.join()
        for th in self.threads:
            th.join(30)


def run_trace(kind, rep, rates):
    from ray import serve
    name = f"t{kind}{rep}"
    url = answering(deploy(kind, name))
    load = OpenLoop(url, rates, seed=rep)
    replica_s = short_s = 0.0
    last = time.time()
    short = []  # (from, to): fewer replicas than the load needs
    while load.feeder.is_alive():
        time.sleep(0.25)
        now, n = time.time(), running(name)
        replica_s += n * (now - last)
        if n * TARGET < load.rate_at(now) * WORK_S:
            short_s += now - last
            short.append((last, now))
        last = now
    load.join()
    serve.delete(name)
    done = sorted(lat for _, lat in load.records if lat is not None)
    # "steady": requests sent while the endpoint had the replicas the load needed, and not in
    # the 10 s after a shortage (the queue it left drains meanwhile)
    steady = sorted(lat for t, lat in load.records if lat is not None
                    and not any(a <= t <= b + 10 for a, b in short))

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")
    return {"p50_ms": pct(done, 0.5), "p99_ms": pct(done, 0.99),
            "steady_p99_ms": pct(steady, 0.99), "steady_n": len(steady),
            "failed": sum(1 for _, lat in load.records if lat is None),
            "requests": len(load.records), "replica_s": replica_s, "short_s": short_s}


def main_trace(reps) -> int:
    import ray
    from ray import serve
    rates = trace_rates()
    print(f"replaying windows {TRACE_SLICE[0]}..{TRACE_SLICE[1] - 1} of the GenAI trace: "
          f"{len(rates)} x 5 min in {len(rates) * WINDOW_S:.0f} s, peak {PEAK_RPS:g} req/s, "
          f"low {min(rates):.2f} req/s", flush=True)
    cluster = one_node_cluster()
    results = {"ours": [], "default": []}
    try:
        for rep in range(reps):
            for kind in ("ours", "default"):
                r = run_trace(kind, rep, rates)
                results[kind].append(r)
                print(f"{kind:<8} rep {rep}: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                      f"steady p99 {r['steady_p99_ms']:.0f} ms ({r['steady_n']} requests), "
                      f"failed {r['failed']} of {r['requests']}, replica-s {r['replica_s']:.0f}, "
                      f"under-provisioned {r['short_s']:.1f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(f"\n{'':<9}{'p50 ms':>8}{'p99 ms':>8}{'steady p99':>11}{'failed':>8}{'requests':>10}{'replica-s':>11}"
          f"{'short s':>9}   (medians of {reps}; 2 cores, CPU only)")
    for kind, rows in results.items():
        m = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"{kind:<9}{m['p50_ms']:>8.0f}{m['p99_ms']:>8.0f}{m['steady_p99_ms']:>11.0f}"
              f"{m['failed']:>8.0f}"
              f"{m['requests']:>10.0f}{m['replica_s']:>11.0f}{m['short_s']:>9.1f}")
    return 0


# -- (c) an endpoint that borrows nodes from elastic training ------------------------------------

POOL_NODES = 3
POOL_WORK_S = 1.0
POOL_CLIENTS = 4  # 2 per replica: the endpoint needs 2 of the 3 nodes under the load


def run_pool(kind, rep, tmp, etcd, load_s=30.0):
    """ours: a 1:3 training job in the pool and a scale-to-zero endpoint of the pool; the
    partition: a 1:2 job and the endpoint on the third node with Serve's default policy (what a
    platform team does today so that training cannot starve the endpoint)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ray import serve
    from ray.serve.config import AutoscalingConfig
    from ray_pool import AGENT_FLAGS, agent_args, at_world, steps_in, wait

    from integrations.ray.client import PoolClient
    from integrations.ray.spec import TRAIN as TRAIN_KIND
    from integrations.ray.spec import Submission
    from serving import endpoint
    from serving.spec import EndpointSpec
    name, ep = f"train-{kind}{rep}", f"ep-{kind}{rep}"
    width = POOL_NODES if kind == "ours" else POOL_NODES - 1
    logs = tmp / "members" / name
    with PoolClient(etcd) as pool:
        pool.submit(Submission(name, TRAIN_KIND, agent_args(0.05, str(tmp / f"{name}.ckpt")),
                               min_members=1, max_members=width, cwd=str(REPO),
                               agent_args=AGENT_FLAGS))
        train = lambda: steps_in(logs.glob("*.log"))  # noqa: E731
        wait(lambda: at_world(train(), width) >= 12, 180, f"training at {width}")
        spec = EndpointSpec(ep, "examples.serve_model:Model", min_replicas=0, max_replicas=2,
                            target_concurrency=2, max_concurrency=2, max_queued=1000, cpus=1,
                            idle_s=5, stable_window_s=6, panic_window_s=2, pool=etcd)
        if kind == "ours":
            url = endpoint.deploy(spec, http_port=PORT, path=str(REPO))
        else:
            endpoint.connect(None, PORT, spec.timeout_s)
            dep = serve.deployment(endpoint.Replica, name=ep, max_ongoing_requests=2,
                                   max_queued_requests=1000, ray_actor_options={"num_cpus": 1},
                                   autoscaling_config=AutoscalingConfig(
                                       min_replicas=1, max_replicas=2,
                                       target_ongoing_requests=2))
            serve.run(dep.bind(spec.target, str(REPO), "1", 2), name=ep, route_prefix=f"/{ep}",
                      blocking=False)
            url = f"http://127.0.0.1:{PORT}/{ep}"
            wait(lambda: running(ep) == 1, 60, "the partition's replica")
        step = time.time()
        load = Clients(url, POOL_CLIENTS)
        capacity_at = None
        while time.time() - step < load_s:
            time.sleep(0.25)
            if capacity_at is None and running(ep) >= 2:
                capacity_at = time.time()
        load.stop()
        ended = time.time()
        if kind == "ours":
            wait(lambda: any(w == width and t > ended for t, _, w in train()), 120,
                 "training back at full size")
        time.sleep(max(0.0, ended + 20 - time.time()))  # the window counted: to the load's end + 20 s
        steps = train()
        regrown = next((t for t, _, w in steps if t > ended and w == width), None)
        window = [s for s in steps if step - 10 <= s[0] <= ended + 20]
        # steps trained again: a step whose number is at or below one trained before it
        lost = sum(max(0, a[1] - b[1] + 1) for a, b in zip(window, window[1:]) if b[1] <= a[1])
        pause = max((b[0] - a[0] for a, b in zip(window, window[1:])), default=None)
        node_s = sum(a[2] * (b[0] - a[0]) for a, b in zip(window, window[1:]))
        if kind == "ours":
            endpoint.delete(ep)
        else:
            serve.delete(ep)
        pool.stop(name)
        wait(lambda: pool.status(name)["state"] in ("stopped", "finished", "failed"), 120,
             "the job to stop")
    steady_from = capacity_at if capacity_at is not None else step + load_s / 2
    steady = sorted(lat for t, lat in load.records if lat is not None and t >= steady_from)
    first = min((t + lat for t, lat in load.records if lat is not None), default=None)
    return {"capacity_s": None if capacity_at is None else capacity_at - step,
            "first_answer_s": None if first is None else first - step,
            "p99_ms": steady[min(len(steady) - 1, int(0.99 * len(steady)))] * 1000
            if steady else float("nan"),
            "failed": sum(1 for _, lat in load.records if lat is None),
            "steps_lost": lost, "pause_s": pause,
            "regrow_s": None if regrown is None else regrown - ended,
            "train_node_s": node_s, "window_s": window[-1][0] - window[0][0] if window else 0}


def main_pool(reps) -> int:
    import logging
    import tempfile

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from integrations.ray.controller import NAMESPACE, Controller
    from rendezvous.embedded import EmbeddedEtcd
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="serving-pool-bench-"))
    results = {"ours": [], "partition": []}
    with EmbeddedEtcd() as etcd:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False})
        for _ in range(POOL_NODES):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="ERROR",
                 log_to_driver=False)
        ctl = Controller(etcd.endpoint, log_dir=str(tmp / "members"), tick_s=0.2).start()
        stop = threading.Event()
        loop = threading.Thread(target=ctl.serve, args=(stop,), daemon=True)
        loop.start()
        try:
            for rep in range(reps):
                for kind in ("ours", "partition"):
                    r = run_pool(kind, rep, tmp, etcd.endpoint)
                    results[kind].append(r)
                    print(f"{kind:<10} rep {rep}: {json.dumps(r)}", flush=True)
        finally:
            stop.set()
            loop.join(30)
            ctl.close()
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()

    def med(rows, k):
        xs = [r[k] for r in rows if r[k] is not None]
        return statistics.median(xs) if xs else None

    def fmt(x, f="{:.1f}"):
        return "never" if x is None else f.format(x)
    print(f"\n{'':<11}{'1st answer s':>13}{'2 replicas s':>13}{'p99 ms':>8}{'failed':>8}"
          f"{'steps lost':>11}{'pause s':>8}{'regrow s':>9}{'train node-s':>13}"
          f"   (medians of {reps})")
    for kind, rows in results.items():
        print(f"{kind:<11}{fmt(med(rows, 'first_answer_s')):>13}{fmt(med(rows, 'capacity_s')):>13}"
              f"{fmt(med(rows, 'p99_ms'), '{:.0f}'):>8}{fmt(med(rows, 'failed'), '{:.0f}'):>8}"
              f"{fmt(med(rows, 'steps_lost'), '{:.0f}'):>11}{fmt(med(rows, 'pause_s'), '{:.2f}'):>8}"
              f"{fmt(med(rows, 'regrow_s')):>9}{fmt(med(rows, 'train_node_s'), '{:.0f}'):>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
