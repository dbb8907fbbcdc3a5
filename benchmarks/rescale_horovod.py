"""Rescale latency of Horovod workers: this launcher (`--backend horovod`) against horovodrun's
own elastic mode, side by side on the same stock `hvd.elastic` script.

benchmarks/rescale_horovod_train.py (hvd.elastic.run, TorchState committed every 5 steps, 0.05 s
of made-up compute per step), one worker per "node":

  ours-horovod  python -m elastic.run --backend horovod --nnodes 1:2 --nproc-per-node 1, one agent
                per node, on an etcd of the benchmark's own
  horovodrun    horovodrun --gloo -np 1 --min-np 1 --max-np 2 --network-interface lo
                --host-discovery-script <a script printing a hosts file the benchmark edits>;
                the two nodes are two names of this machine, localhost and 127.0.0.1 (both run
                without ssh)

Two scenarios per repetition:

  (a) scale-up:   node A trains alone at world=1; node B appears (ours: agent B starts;
                  horovodrun: `127.0.0.1:1` is added to the hosts file) -> first STEP at world=2;
                  for ours also B's `joined` event (it registered) -> that STEP.
  (b) scale-down: A and B train at world=2; B dies (ours: SIGKILL to agent B and everything
                  under it; horovodrun: SIGKILL to the worker of host 127.0.0.1, which leaves the
                  hosts file at the same moment) -> first STEP at world=1.

Times come from the lines the script prints; per change also how long rank 0 trained nothing
(`paused`: its last step in the old world -> its first in the new; a newcomer that starts while
the others wait costs them this), the steps trained twice (`recomputed`) and whether rank 0
kept its process. Launchers alternate within each of --reps repetitions; the report gives each
one's medians and the ratio horovodrun / ours.

    python benchmarks/rescale_horovod.py [--reps 3] [--timeout 90]
    python benchmarks/rescale.py --horovod ...     (after the torch launchers, in the same run)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.support
from rescale_train import Outcome, Median, find_change, machine, ratio, read_lines  # noqa: E402

from tests.support import kill_tree  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "benchmarks" / "rescale_horovod_train.py"
TRAIN_ARGS = ["--commit-every", "5", "--step-sleep", "0.05"]
LAUNCHERS = ("ours-horovod", "horovodrun")
BASE = "ours-horovod"
HOSTS = ("localhost", "127.0.0.1")  # horovodrun's nodes A and B
POLL_S = 0.05
SETTLE_AT_WORLD_2_S = 2.0
EVENT_GRACE_S = 1.0
SCENARIOS = {
    "scale-up": "(a) scale-up 1 -> 2 nodes: B appears -> first step at world=2",
    "scale-down": "(b) SIGKILL scale-down 2 -> 1 nodes: B killed -> first step at world=1",
}


class NoResult(Exception):
    def __init__(self, kind: str, detail: str, waited: float = 0.0):
        super().__init__(detail)
        self.kind, self.waited = kind, waited

    def outcome(self) -> Outcome:
        return Outcome(kind=self.kind, detail=str(self), waited=self.waited)


class Run:
    """One repetition for one launcher: nodes A and B of one job, and their logs."""

    def __init__(self, launcher: str, rep_dir: Path, timeout: float, endpoint: str):
        self.launcher, self.dir, self.timeout, self.endpoint = launcher, rep_dir, timeout, endpoint
        self.dir.mkdir(parents=True)
        self.procs: Dict[str, subprocess.Popen] = {}
        self.hosts_file = self.dir / "hosts"

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info) -> None:
        for proc in self.procs.values():
            kill_tree(proc)

    def _spawn(self, name: str, argv: List[str]) -> float:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        with open(self.dir / f"{name}.log", "wb") as out:
            started = time.time()
            self.procs[name] = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        return started

    # -- the two ways a node appears and dies -----------------------------------------------
    def start_a(self) -> float:
        if self.launcher == BASE:
            return self._spawn("A", self._agent("A"))
        self._write_hosts(HOSTS[:1])
        discover = self.dir / "discover.sh"
        discover.write_text(f"#!/bin/sh\ncat {self.hosts_file}\n")
        discover.chmod(0o755)
        return self._spawn("A", [shutil.which("horovodrun") or "horovodrun", "--gloo", "-np", "1",
                                 "--min-np", "1", "--max-np", "2", "--network-interface", "lo",
                                 "--host-discovery-script", str(discover),
                                 sys.executable, str(TRAIN_SCRIPT), *TRAIN_ARGS])

    def add_b(self) -> float:
        if self.launcher == BASE:
            return self._spawn("B", self._agent("B"))
        started = time.time()
        self._write_hosts(HOSTS)
        return started

    def kill_b(self) -> float:
        if self.launcher == BASE:
            killed = time.time()
            kill_tree(self.procs.pop("B"))
            return killed
        worker = self._horovodrun_worker(HOSTS[1])
        killed = time.time()
        worker.kill()
        self._write_hosts(HOSTS[:1])
        return killed

    def _agent(self, name: str) -> List[str]:
        return [sys.executable, "-m", "elastic.run", "--backend", "horovod", "--nnodes", "1:2",
                "--nproc-per-node", "1", "--rdzv-endpoint", self.endpoint,
                "--rdzv-id", f"bench-{self.dir.name}", "--rdzv-conf", "last_call_timeout=0.5",
                "--monitor-interval", "0.1", "--log-dir", str(self.dir / f"logs-{name}"),
                str(TRAIN_SCRIPT), *TRAIN_ARGS]

    def _write_hosts(self, hosts) -> None:
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{h}:1\n" for h in hosts))
        tmp.replace(self.hosts_file)  # the discovery script never reads half a file

    def _horovodrun_worker(self, host: str) -> psutil.Process:
        for proc in psutil.Process(self.procs["A"].pid).children(recursive=True):
            try:
                env = proc.environ()
            except psutil.Error:
                continue
            if env.get("HOROVOD_HOSTNAME") == host and "python" in proc.name():
                return proc
        raise NoResult("failed", f"horovodrun has no worker on host {host}")

    # -- reading the script's lines ---------------------------------------------------------
    def wait_for_step(self, world: int, after: float) -> float:
        began = time.monotonic()
        while time.monotonic() < began + self.timeout:
            found = [x.time for x in read_lines(list(self.dir.rglob("*.log")))
                     if x.kind == "STEP" and x.world == world and x.time >= after]
            if found:
                return min(found)
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise NoResult("failed", f"{name} exited with code {proc.returncode}; see "
                                   f"{self.dir / (name + '.log')}", time.monotonic() - began)
            time.sleep(POLL_S)
        raise NoResult("hang", f"no step at world={world} after {self.timeout:g} s", self.timeout)

    def outcome(self, old: int, new: int, t0: float) -> Outcome:
        time.sleep(EVENT_GRACE_S)
        change = find_change(read_lines(list(self.dir.rglob("*.log"))), old, new, t0)
        if change is None:
            raise NoResult("failed", f"the step at world={new} is no longer in the logs")
        joined = None
        if self.launcher == BASE and new > old:
            events = self.dir / "logs-B" / "events.jsonl"
            times = [json.loads(line)["time"] for line in events.read_text().splitlines()
                     if '"joined"' in line] if events.exists() else []
            joined = change.first.time - times[0] if times else None
        paused = change.first.time - change.last_old.time if change.last_old else None
        return Outcome(seconds=change.first.time - t0, recomputed=change.recomputed,
                      same_pid=change.same_pid, from_joined=joined, paused=paused)

    def measure(self) -> Dict[str, Outcome]:
        results: Dict[str, Outcome] = {}
        try:
            started = self.start_a()
            self.wait_for_step(1, started)
            t0 = self.add_b()
            self.wait_for_step(2, t0)
            results["scale-up"] = self.outcome(1, 2, t0)
        except NoResult as exc:
            results["scale-up"] = exc.outcome()
            results["scale-down"] = NoResult("failed", "not measured: no world of 2").outcome()
            return results
        try:
            time.sleep(SETTLE_AT_WORLD_2_S)
            killed = self.kill_b()
            self.wait_for_step(1, killed)
            results["scale-down"] = self.outcome(2, 1, killed)
        except NoResult as exc:
            results["scale-down"] = exc.outcome()
        return results


def cells(o: Outcome) -> List[str]:
    if o.seconds is None:
        return [o.kind.upper(), "", "", "", ""]
    joined = f"{o.from_joined:.2f} s" if o.from_joined is not None else "-"
    paused = o.paused
    pid = {None: "?", True: "same", False: "new"}[o.same_pid]
    return [f"{o.seconds:.2f} s", joined, "?" if paused is None else f"{paused:.2f} s",
            "?" if o.recomputed is None else str(o.recomputed), pid]


def report(results: Dict[str, List[Dict[str, Outcome]]], reps: int, timeout: float) -> Median:
    """Print the tables and the summary; return horovodrun's scale-up median."""
    print(f"\nHorovod workers. Machine: {machine()}; horovod {_horovod_version()}.\n{reps} "
          f"repetition(s), launchers alternated in each, each wait bounded at {timeout:g} s.")
    summary = []
    for scenario, title in SCENARIOS.items():
        print(f"\n{title}")
        widths = [7, 14, 15, 13, 10, 12, 12]
        row = lambda c: " ".join(f"{x:<{w - 1}}" for x, w in zip(c, widths)).rstrip()  # noqa: E731
        print(row(["rep", "launcher", "to first step", "from joined", "paused", "recomputed",
                   "rank-0 pid"]))
        for rep in range(reps):
            for name in results:
                o = results[name][rep][scenario]
                print(row([str(rep + 1), name, *cells(o)]) + (f"  ({o.detail})" if o.detail else ""))
        medians, paused = {}, {}
        for name in results:
            outcomes = [r[scenario] for r in results[name]]
            medians[name], paused[name] = Median.of(outcomes), Median.of(outcomes, "paused")
            joined = Median.of(outcomes, "from_joined") \
                if name == BASE and scenario == "scale-up" else "-"
            rec = Median.of(outcomes, "recomputed").seconds
            print(row(["median", name, str(medians[name]), str(joined), str(paused[name]),
                       "n/a" if rec is None else f"{rec:g}"]))
        if BASE in medians and "horovodrun" in medians:
            shown = ratio(medians[BASE], medians["horovodrun"])[1]
            shown_paused = ratio(paused[BASE], paused["horovodrun"])[1]
            print(f"ratio horovodrun/{BASE}: {shown} (paused: {shown_paused})")
            summary.append(f"{scenario}: ours {medians[BASE]}, horovodrun {medians['horovodrun']} "
                           f"({shown}); rank 0 paused: ours {paused[BASE]}, horovodrun "
                           f"{paused['horovodrun']} ({shown_paused})")
    print(f"\nHOROVOD SUMMARY ({os.cpu_count()} cores, CPU only, median of {reps} reps) "
          + "; ".join(summary))
    return Median.of([r["scale-up"] for r in results["horovodrun"]])


def _horovod_version() -> str:
    try:
        import horovod
        return horovod.__version__
    except ImportError:
        return "not installed"


def run(reps: int, timeout: float, log_root: Path) -> Median:
    """Measure both launchers, alternating, print the report, return horovodrun's scale-up."""
    from rendezvous.embedded import EmbeddedEtcd

    results: Dict[str, List[Dict[str, Outcome]]] = {name: [] for name in LAUNCHERS}
    with EmbeddedEtcd() as etcd:
        for rep in range(1, reps + 1):
            for name in LAUNCHERS:
                with Run(name, log_root / f"rep{rep}-{name}", timeout, etcd.endpoint) as one:
                    outcome = one.measure()
                results[name].append(outcome)
                print(f"rep {rep}/{reps} {name}: " + "; ".join(
                    f"{k} " + " ".join(c for c in cells(v) if c) + (f" ({v.detail})" if v.detail else "")
                    for k, v in outcome.items()), flush=True)
    return report(results, reps, timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds to wait for a step in a new world")
    args = parser.parse_args()
    try:
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        parser.error(f"Horovod cannot be imported ({exc}); install it with "
                     "`bash integrations/horovod/install.sh`")
    log_root = Path(tempfile.mkdtemp(prefix="rescale-horovod-"))
    print(f"Logs: {log_root}", flush=True)
    run(args.reps, args.timeout, log_root)


if __name__ == "__main__":
    main()
