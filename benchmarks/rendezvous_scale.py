"""The rendezvous at 10 to 1,000 nodes: forming a round, losing a node to SIGKILL, and the cost at rest.

N agents against one real etcd (embedded, on loopback). Each agent is what the launcher runs for
a node, minus its workers: its own etcd connection (`EtcdStore`), a real `Membership` (lease,
keep-alive, leadership, the leader's decisions), a real `PeerMonitor` probing real health
endpoints, and a loop that steps on every watch event, as the agent's does, and every LOOP_S. A
machine cannot hold 1,000 Python processes, so agents share host processes (--per-process of them,
each in its own threads); the agent that is killed runs alone in its process, so its SIGKILL is
a real one (its connections drop, its health port refuses).

Per N and scheme:
  form   the last agent's registration -> every agent holding the round of N
         (min nodes N-1, so the round is published the moment the N-th registers)
  kill   SIGKILL of one agent's process -> every survivor holding the round of N-1
         (its ring neighbours find its health port closed and revoke its lease)
  rest   etcd requests and health probes per agent per second over --rest seconds, nothing
         changing (lease keep-alives are counted as requests)

Schemes, alternated within each repetition:
  now     a watching store answers from its mirror of the job's keys; each agent probes its two
          ring successors
  before  the previous design, kept here as the anchor: every snapshot reads the job's whole
          prefix; every agent probes every other one (run up to --before-max nodes: it grows as
          N^2 and saturates this machine first)

The machine: 2 cores for all N agents, etcd and this script. At large N the times below say more
about this machine's CPU than about the design; the per-agent rates do not depend on it.

Measured here (2 cores, CPU only, one repetition): N=100 and 500 with `--sizes 100,500,1000
--before-max 100 --rest 10 --timeout 300`, when every host process was started at once (that
run was stopped during N=1000); N=1000 with `--sizes 1000 --before-max 0 --rest 10 --timeout
300`, host processes started one after another as they are now:

      N scheme    form s   kill s  etcd req/agent/s  probes/agent/s
    100 now         0.02     0.58              1.27            1.93
    100 before      2.11     2.00              3.06            5.35   (CPU-bound: its 0.1 s passes
                                                                     and 99 probes/s per agent)
    500 now         7.98     9.25              1.21            1.95   (CPU-bound: 500 agents' loops,
                                                                     probes and keep-alives fill
                                                                     both cores)
   1000 now            -        -                 -               -   not reached: past ~550
                                                                     agents the machine's load
                                                                     passed 400 and lease
                                                                     keep-alives starved (5,000+
                                                                     leases lost) while hosts
                                                                     were still starting

The per-agent rates do not grow with N; the times at 500 are this machine's CPU. A newcomer reads
the job once (its watch's read) and every later change arrives on the watch. Host processes now
start one after another, each once the previous one's agents registered (the 100 and 500 rows
predate that; the figures count from the last registration either way).

    python benchmarks/rendezvous_scale.py [--sizes 10,100,500,1000] [--reps 1] [--rest 10]
                                          [--per-process 25] [--before-max 100] [--timeout 300]
"""

import argparse
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMES = ("now", "before")
# How often an agent's loop steps without a watch event. The agent's loop wakes every 0.1 s for
# its workers; the previous design read the whole job on each of those passes, so "before" keeps
# 0.1 s. With the mirror a pass reads nothing, and these agents have no workers: once a second
# saves this machine's two cores for the thousand agents.
LOOP_S = {"now": 1.0, "before": 0.1}


# -- a host process: several agents -------------------------------------------------------------
def host_main(args) -> None:
    import logging

    import launcher.peers as peers
    from launcher.health import HealthServer
    from rendezvous.api import RendezvousSettings
    from rendezvous.membership import Membership
    from rendezvous.store import EtcdStore

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(message)s")
    out_lock = threading.Lock()
    counts = {"requests": 0, "probes": 0}
    by_method: dict = {}
    count_lock = threading.Lock()

    def say(**record) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    def bump(what: str) -> None:
        with count_lock:
            counts[what] += 1

    import rendezvous.liveness as liveness
    real_probe, real_kept_probe = peers.probe, liveness.Prober.probe

    def counted_probe(*a, **k):
        bump("probes")
        return real_probe(*a, **k)

    def counted_kept_probe(self, *a, **k):
        bump("probes")
        return real_kept_probe(self, *a, **k)

    peers.probe = counted_probe  # probes after a collective error
    liveness.Prober.probe = counted_kept_probe  # the prober's own, each interval

    class Counting:
        """The client of one store, counting requests (the watch's stream is opened once)."""
        QUIET = {"add_watch_prefix_callback", "cancel_watch", "close"}

        def __init__(self, client):
            self._client = client

        def __getattr__(self, name):
            attr = getattr(self._client, name)
            if callable(attr) and name not in self.QUIET:
                def counted(*a, **k):
                    bump("requests")
                    with count_lock:
                        by_method[name] = by_method.get(name, 0) + 1
                    return attr(*a, **k)
                return counted
            return attr

    class ReadingStore(EtcdStore):
        """The previous design: every snapshot reads the whole job."""

        def snapshot(self):
            return self._read()

    settings = RendezvousSettings(run_id=args.run_id, min_nodes=args.min_nodes,
                                  max_nodes=args.max_nodes, last_call_timeout=120.0,
                                  join_settle=0.1, lease_ttl=10.0, join_timeout=3600.0)
    stop = threading.Event()
    agents = []

    class Agent:
        def __init__(self, node_id: str) -> None:
            store_cls = EtcdStore if args.scheme == "now" else ReadingStore
            self.store = store_cls(args.endpoint, args.run_id, timeout=30.0)
            self.store._client = Counting(self.store._client)
            self.health = HealthServer("127.0.0.1", node_id)
            self.membership = Membership(self.store, settings, host="127.0.0.1", nproc=1,
                                         health_addr=self.health.addr, node_id=node_id)
            self.wake = threading.Event()
            self.peers = peers.PeerMonitor(
                self.membership, 1.0, self.wake.set,
                probed_peers=peers.PROBED_PEERS if args.scheme == "now" else 10**9)
            self.thread = threading.Thread(target=self.run, name=node_id, daemon=True)

        def run(self) -> None:
            node_id = self.membership.node_id
            if args.scheme == "now":  # as the agent does: watching, then joining
                self.store.watch(self.wake.set)
            self.membership.join()
            say(agent=node_id, event="registered", t=time.time())
            if args.scheme == "before":
                self.store.watch(self.wake.set)
            self.peers.start()
            held = None
            while not stop.is_set():
                try:
                    snap, _, wake_at = self.membership.step()
                except Exception as exc:  # etcd busy: as the agent does, try again soon
                    say(agent=node_id, event="error", error=str(exc)[:200], t=time.time())
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                self.peers.update(snap)
                rnd = snap.round
                if rnd is not None and rnd.active and (rnd.number, len(rnd.members)) != held:
                    held = (rnd.number, len(rnd.members))
                    say(agent=node_id, event="round", number=rnd.number,
                        size=len(rnd.members), t=time.time())
                timeout = LOOP_S[args.scheme]
                if wake_at is not None:
                    timeout = max(0.0, min(timeout, wake_at - time.time()))
                self.wake.wait(timeout)
                self.wake.clear()

        def close(self) -> None:
            self.peers.stop()
            self.membership.leave()
            self.health.close()
            self.store.close()

    for i in range(args.count):
        agent = Agent(f"{args.prefix}-{i:04d}")
        agents.append(agent)
        agent.thread.start()
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "rest":
            seconds = float(command[1])
            with count_lock:
                counts.update(requests=0, probes=0)
                by_method.clear()
            time.sleep(seconds)
            with count_lock:
                say(event="rest", agents=args.count, seconds=seconds, by_method=dict(by_method),
                    **counts)
        elif command[0] == "quit":
            break
    stop.set()
    for agent in agents:
        agent.close()
    say(event="closed")


# -- the driver ------------------------------------------------------------------------------------
class Host:
    def __init__(self, args, endpoint, run_id, scheme, prefix, count, n, logs: Path) -> None:
        self.lines: "queue.Queue[dict]" = queue.Queue()
        self.prefix = prefix
        stderr = open(logs / f"{prefix}.err", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--host", "--endpoint", endpoint, "--run-id", run_id,
             "--scheme", scheme, "--prefix", prefix, "--count", str(count),
             "--min-nodes", str(max(1, n - 1)), "--max-nodes", str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            start_new_session=True)
        stderr.close()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            record["host"] = self.prefix
            self.lines.put(record)

    def send(self, command: str) -> None:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def close(self, timeout: float = 60.0) -> None:
        self.send("quit")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def collect(hosts, until, timeout: float):
    """Records from every host until `until(records)` is true; None on timeout."""
    records = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = False
        for host in hosts:
            try:
                while True:
                    records.append(host.lines.get_nowait())
                    got = True
            except queue.Empty:
                pass
        if until(records):
            return records
        if not got:
            time.sleep(0.05)
    return None


def run_one(args, endpoint: str, n: int, scheme: str, logs: Path) -> dict:
    from rendezvous.store import EtcdStore

    run_id = f"scale-{scheme}-{n}-{uuid.uuid4().hex[:6]}"
    result = {"n": n, "scheme": scheme}
    victim = Host(args, endpoint, run_id, scheme, "victim", 1, n, logs)
    hosts = [victim]
    try:
        if collect([victim], lambda r: any(x["event"] == "registered" for x in r), 120) is None:
            result["error"] = "the first agent did not register"
            return result
        left = n - 1
        index = 0
        records = []
        while left > 0:
            count = min(args.per_process, left)
            host = Host(args, endpoint, run_id, scheme, f"h{index:03d}", count, n, logs)
            hosts.append(host)
            # The next host once this one's agents registered: a start paced by what the machine
            # can do (the figures count from the last registration, not from the first start).
            got = collect([host], lambda r, c=count: sum(
                1 for x in r if x["event"] == "registered") >= c, args.timeout)
            records.extend(got or [])
            left -= count
            index += 1

        def formed(new):
            records.extend(new)
            new.clear()
            registered = sum(1 for r in records if r["event"] == "registered")
            holding = {r["agent"] for r in records if r["event"] == "round" and r["size"] == n}
            return registered >= n - 1 and len(holding) == n

        got = collect(hosts[1:] + [victim], formed, args.timeout)
        everything = records + (got or [])
        registered = [r["t"] for r in everything if r["event"] == "registered"]
        holding = [r["t"] for r in everything if r["event"] == "round" and r["size"] == n]
        result["errors"] = sum(1 for r in everything if r["event"] == "error")
        if got is None:
            result["error"] = (f"round of {n} not held by every agent within {args.timeout:g} s "
                               f"({len(registered)} registered, {len(holding)} holding)")
            return result
        result["form_s"] = max(holding) - max(registered)

        for host in hosts:
            host.send(f"rest {args.rest}")
        rests = collect(hosts, lambda r: sum(1 for x in r if x["event"] == "rest") == len(hosts),
                        args.rest + 120)
        if rests is not None:
            rest = [r for r in rests if r["event"] == "rest"]
            agents = sum(r["agents"] for r in rest)
            result["requests_per_agent_s"] = sum(r["requests"] for r in rest) / agents / args.rest
            result["probes_per_agent_s"] = sum(r["probes"] for r in rest) / agents / args.rest
            methods = {}
            for r in rest:
                for name, count in r["by_method"].items():
                    methods[name] = methods.get(name, 0) + count
            result["requests_by_method"] = methods

        killed_at = time.time()
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        hosts.remove(victim)
        survivors = n - 1
        seen = set()

        def shrunk(new):
            for r in new:
                if r["event"] == "round" and r["size"] == survivors and r["t"] >= killed_at:
                    seen.add(r["agent"])
                    shrunk.last = max(shrunk.last, r["t"])
            new.clear()
            return len(seen) == survivors
        shrunk.last = 0.0
        if collect(hosts, shrunk, args.timeout) is None:
            result["error"] = (f"round of {survivors} not held by every survivor within "
                               f"{args.timeout:g} s of the kill ({len(seen)} holding)")
        else:
            result["kill_s"] = shrunk.last - killed_at
        return result
    finally:
        for host in hosts:
            host.close()
        try:
            store = EtcdStore(endpoint, run_id)
            store.delete_job()
            store.close()
        except Exception:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500,1000")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--rest", type=float, default=10.0)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--before-max", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300.0)
    # a host process
    parser.add_argument("--host", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--scheme", choices=SCHEMES, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--min-nodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-nodes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host:
        host_main(args)
        return

    from rendezvous.embedded import EmbeddedEtcd

    sizes = [int(s) for s in args.sizes.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="elastic-rdzv-scale-"))
    results = []
    with EmbeddedEtcd() as etcd:
        for rep in range(args.reps):
            for n in sizes:
                schemes = [s for s in SCHEMES if s == "now" or n <= args.before_max]
                if rep % 2:
                    schemes.reverse()
                for scheme in schemes:
                    began = time.monotonic()
                    result = run_one(args, etcd.endpoint, n, scheme, logs)
                    result["wall_s"] = time.monotonic() - began
                    results.append(result)
                    print(json.dumps(result), flush=True)

    print()
    print(f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"CPU only, one etcd and every agent on it; agents {args.per_process} per process; "
          f"{args.reps} repetition(s), medians; host logs in {logs}")
    print()
    header = (f"{'N':>5} {'scheme':<7} {'form s':>8} {'kill s':>8} {'etcd req/agent/s':>17} "
              f"{'probes/agent/s':>15}  note")
    print(header)

    def median(rows, key):
        values = [r[key] for r in rows if key in r]
        return statistics.median(values) if values else None

    def cell(value, width, digits=2):
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    summary = {}
    for n in sizes:
        for scheme in SCHEMES:
            rows = [r for r in results if r["n"] == n and r["scheme"] == scheme]
            if not rows:
                continue
            errors = "; ".join(r["error"] for r in rows if "error" in r)
            m = {k: median(rows, k) for k in ("form_s", "kill_s", "requests_per_agent_s",
                                              "probes_per_agent_s")}
            summary[(n, scheme)] = m
            print(f"{n:>5} {scheme:<7} {cell(m['form_s'], 8)} {cell(m['kill_s'], 8)} "
                  f"{cell(m['requests_per_agent_s'], 17)} {cell(m['probes_per_agent_s'], 15)}  "
                  f"{errors}")
    print()
    parts = []
    for n in sizes:
        now = summary.get((n, "now"))
        if now and now["kill_s"] is not None:
            parts.append(f"N={n}: form {now['form_s']:.2f} s, kill {now['kill_s']:.2f} s, "
                         f"{now['requests_per_agent_s']:.2f} req and "
                         f"{now['probes_per_agent_s']:.1f} probes per agent per s")
    print("summary: " + "; ".join(parts))


if __name__ == "__main__":
    main()
