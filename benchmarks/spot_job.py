"""One job under one launcher: its own etcd (ours), its agents (elastic.run or torchrun, one node
each), the notices and kills that replay a schedule, and the lines its script printed."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rescale import last_error  # noqa: E402

from launcher.network import free_port  # noqa: E402
from tests.support import kill_tree  # noqa: E402
from rescale_train import Line, read_lines  # noqa: E402
from spot_analysis import COMMIT_EVERY, Done, Member, analyse, read_members  # noqa: E402
from spot_schedule import SLOTS, Preemption, actions  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "benchmarks" / "spot_train.py"
TRAIN_ARGS = ["--commit-every", str(COMMIT_EVERY), "--step-sleep", "0.05"]  # never ends by itself
# -> our --rescale-mode. torchrun runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see the docstring);
# torchrun-shared without it, to show what a node joining does to torchrun's default.
LAUNCHERS = {"ours": "auto", "ours-restart": "restart", "torchrun": None, "torchrun-shared": None}
MAX_RESTARTS = 1000
POLL_S = 0.05
LINES_POLL_S = 0.5
ETCD_START_TIMEOUT_S = 30.0


class Failed(Exception):
    """The job could not be brought up (etcd did not start, the job never reached full size)."""


@dataclass
class Job:
    launcher: str
    dir: Path
    args: argparse.Namespace
    agents: dict = field(default_factory=dict)      # name -> Popen
    started: dict = field(default_factory=dict)     # name -> unix time
    leaving: set = field(default_factory=set)       # given a notice: exiting is expected
    exits: dict = field(default_factory=dict)       # name -> exit code, of agents that exited unasked
    rdzv: Optional[subprocess.Popen] = None
    endpoint: str = ""

    @property
    def ours(self) -> bool:
        return self.launcher.startswith("ours")

    def __enter__(self) -> "Job":
        self.dir.mkdir(parents=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for name in list(self.agents):
            kill_tree(self.agents.pop(name))
        if self.rdzv is not None:
            self.rdzv.terminate()  # python -m rendezvous stops its etcd and removes its data dir
            try:
                self.rdzv.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_tree(self.rdzv)
            self.rdzv = None

    # -- processes ----------------------------------------------------------------------------
    def env(self, name: str = "") -> dict:
        # TMPDIR keeps torchrun's and etcd's temporary folders inside this job's directory.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.dir),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
        env["SPOT_NODE"] = name
        if self.launcher == "torchrun":
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        return env

    def start_rendezvous(self) -> None:
        port = free_port()
        with open(self.dir / "etcd.log", "wb") as out:
            self.rdzv = subprocess.Popen([sys.executable, "-m", "rendezvous", "--listen", f"127.0.0.1:{port}"],
                                         cwd=REPO_ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + ETCD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.rdzv.poll() is not None:
                raise Failed(f"etcd exited with code {self.rdzv.returncode}: {last_error(self.dir / 'etcd.log')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                    if b'"true"' in resp.read():
                        self.endpoint = f"127.0.0.1:{port}"
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise Failed(f"etcd was not healthy after {ETCD_START_TIMEOUT_S:g} s")

    def notice_file(self, name: str) -> Path:
        return self.dir / f"notice-{name}"

    def log_dir(self, name: str) -> Path:
        return self.dir / f"agent-{name}-logs"

    def agent_log(self, name: str) -> Path:
        return self.dir / f"agent-{name}.log"

    def command(self, name: str) -> list[str]:
        a = self.args
        script = [str(TRAIN_SCRIPT), "--checkpoint", str(self.dir / "ckpt" / "job.ckpt"), *TRAIN_ARGS]
        common = ["--nnodes", f"1:{a.nodes}", "--nproc-per-node", "1", "--rdzv-endpoint", self.endpoint,
                  "--rdzv-id", f"spot-{self.dir.name}", "--rdzv-conf", f"last_call_timeout={a.last_call}",
                  "--max-restarts", str(MAX_RESTARTS), "--monitor-interval", "0.1"]
        if not self.ours:
            return [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend", "c10d", *common, *script]
        return [sys.executable, "-m", "elastic.run", *common, "--rescale-mode", LAUNCHERS[self.launcher],
                "--log-dir", str(self.log_dir(name)), "--preemption-file", str(self.notice_file(name)),
                "--preemption-grace", f"{a.notice:g}", *script]

    def start_agent(self, name: str) -> float:
        with open(self.agent_log(name), "wb") as out:
            started = time.time()
            self.agents[name] = subprocess.Popen(self.command(name), cwd=REPO_ROOT, env=self.env(name), stdout=out,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = started
        return started

    def give_notice(self, name: str, deadline: float) -> None:
        aside = self.dir / f".notice-{name}.tmp"
        aside.write_text(f"spot benchmark: preempted, terminate at {deadline:.3f}\n")
        os.replace(aside, self.notice_file(name))
        self.leaving.add(name)

    def kill(self, name: str) -> bool:
        """SIGKILL the node's tree; whether its agent was still alive."""
        proc = self.agents.pop(name, None)
        if proc is None:
            return False
        alive = proc.poll() is None
        kill_tree(proc)  # also when the agent is gone: its session may hold leftovers
        return alive

    def check_agents(self) -> None:
        for name, proc in self.agents.items():
            if proc.poll() is not None and name not in self.leaving and name not in self.exits:
                self.exits[name] = proc.returncode

    def wait_until_a_hosts_store(self, timeout: float) -> None:
        """torchrun: every agent on this host tries to host the c10d store; A must win."""
        port = int(self.endpoint.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agents["A"].poll() is not None:
                raise Failed(f"torchrun agent A exited with code {self.agents['A'].returncode} before "
                             f"hosting the store: {last_error(self.agent_log('A'))}")
            try:
                sockets = psutil.Process(self.agents["A"].pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                sockets = []
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets):
                return
            time.sleep(POLL_S)
        raise Failed(f"torchrun agent A did not listen on {self.endpoint} within {timeout:g} s")

    # -- what the script printed -------------------------------------------------------------
    def logs(self) -> list[Path]:
        # Agents' output (torchrun's workers print there too) and our rank logs; not checkpoints.
        return [p for p in self.dir.rglob("*.log") if p.is_file()]

    def lines(self) -> list[Line]:
        return read_lines(self.logs())

    def members(self) -> list[Member]:
        return read_members(self.logs())

    def events(self, name: str) -> list[dict]:
        path = self.log_dir(name) / "events.jsonl"
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            return []

    # -- the phases ----------------------------------------------------------------------------
    def bring_up(self) -> tuple[float, float]:
        """Start the N first nodes, wait for a step at full size, let it settle for --warmup/2 s, then
        train undisturbed for --warmup s, which measure t_step. Returns (t0, t_step)."""
        a = self.args
        if self.ours:
            self.start_rendezvous()
        else:
            self.endpoint = f"127.0.0.1:{free_port()}"
        began = self.start_agent("A")
        if not self.ours:
            self.wait_until_a_hosts_store(a.start_timeout)
        for slot in SLOTS[1:a.nodes]:
            self.start_agent(slot)
        deadline = time.monotonic() + a.start_timeout
        while True:
            self.check_agents()
            if self.exits:
                name, code = next(iter(self.exits.items()))
                raise Failed(f"agent {name} exited with code {code} during start-up: "
                             f"{last_error(self.agent_log(name))}")
            full = [x for x in self.lines() if x.kind == "STEP" and x.world == a.nodes and x.time >= began]
            if full:
                break
            if time.monotonic() > deadline:
                raise Failed(f"no step at world={a.nodes} within {a.start_timeout:g} s of the start")
            time.sleep(LINES_POLL_S)
        window_start = time.time() + a.warmup / 2  # let the first rounds' noise pass
        t0 = window_start + a.warmup
        while time.time() < t0:
            self.check_agents()
            time.sleep(POLL_S)
        if self.exits:
            name, code = next(iter(self.exits.items()))
            raise Failed(f"agent {name} exited with code {code} during warm-up: {last_error(self.agent_log(name))}")
        window = [x for x in self.lines() if x.kind == "STEP" and window_start <= x.time <= t0]
        if len(window) < 2 or any(x.world != a.nodes for x in window) or \
                any(b.step != a_.step + 1 for a_, b in zip(window, window[1:])):
            raise Failed(f"the warm-up window was not undisturbed at world={a.nodes}: "
                         f"{len(window)} steps, worlds {sorted({x.world for x in window})}")
        t_step = (window[-1].time - window[0].time) / (window[-1].step - window[0].step)
        return t0, t_step

    def replay(self, schedule: list[Preemption], t0: float) -> list[Done]:
        done = [Done() for _ in schedule]
        for act in actions(schedule):
            while time.time() < t0 + act.at:
                self.check_agents()
                time.sleep(min(POLL_S, max(0.0, t0 + act.at - time.time())))
            d = done[act.index]
            if act.kind == "notice":
                d.notice = time.time()
                if self.ours:
                    self.give_notice(act.node, t0 + schedule[act.index].kill_at)
            elif act.kind == "kill":
                d.kill = time.time()
                self.leaving.add(act.node)
                d.alive_at_kill = self.kill(act.node)
            else:
                d.start = self.start_agent(act.node)
        t_end = t0 + self.args.duration
        while time.time() < t_end:
            self.check_agents()
            time.sleep(min(POLL_S, max(0.0, t_end - time.time())))
        return done

    def drain(self, schedule, done, t0: float, t_step: float) -> None:
        """After the end, no more faults: wait for the next step (it says whether the job rolls back)
        and for every change's first step in its new world, at most --drain-timeout s."""
        t_end = t0 + self.args.duration
        deadline = time.time() + self.args.drain_timeout
        while time.time() < deadline:
            self.check_agents()
            result = analyse(self.launcher, self.lines(), self.members(), schedule, done, t0, t_end, t_step,
                             final=False)
            if result.after_end is not None and not result.pending:
                return
            time.sleep(LINES_POLL_S)
