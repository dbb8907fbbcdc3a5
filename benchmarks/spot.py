"""Goodput under a replayed spot-preemption schedule: this launcher against torchrun (c10d), side by side.

The job: `--nodes` agents (one "node" each, 1 worker, `--nnodes 1:N`) on this machine, running
benchmarks/spot_train.py, which is benchmarks/rescale_train.py (DDP on gloo, ElasticState committed
and checkpointed every 5 steps to one shared path, 0.05 s of made-up compute per step; written with
integrations.torch.run, so it switches in place under our launcher and is restarted from the
checkpoint under torchrun) plus one MEMBER line per rank per entry into a world. Rank 0 prints
`STEP <unix time> step=N world=W` after each optimizer step and `ENTER ...` on each entry into a world;
the MEMBER lines say which nodes each world held.

The schedule, drawn up front from `--seed` (repetition r uses seed + r - 1) and replayed identically
for every launcher (times are seconds after t0, the end of an undisturbed warm-up at full size):

  - every node but the first (A) is preempted after an exponential lifetime of mean
    `--mean-interval` s, counted from the moment it was started;
  - notice at t, deadline at t + `--notice`; at the deadline the node's whole process tree gets
    SIGKILL if anything of it is still alive;
  - a replacement node (B2, B3, ...) is started `--replace-after` s after the deadline (spot capacity
    coming back), and is itself preempted on the same law;
  - only preemptions whose deadline and replacements whose start fall before `--duration` are kept.

What each launcher gets:

  ours      each agent has its own `--preemption-file`; at notice time the benchmark writes it (written
            aside, renamed into place). `--preemption-grace` is the notice, so the agent knows its
            deadline; it leaves at the next step boundary, its workers committing with the others.
  torchrun  no notice channel: nothing happens at notice time; the node is SIGKILLed at the
            deadline, like a VM reclaimed under it. (SIGTERM first would change nothing here: its
            agent would stop its workers and exit, and the survivors would restart just the same.)
            It runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, torch's opt-out of sharing the
            rendezvous store with the workers: with the default (launcher `torchrun-shared`, not run
            unless asked), in torch 2.13 a node joining a job that has already run a round waits
            for a MASTER_ADDR key the old rank 0 never writes again (it keeps its first round's
            bootstrap info), the old rank 0 waits for the newcomer's role_info, and after 60 s every
            agent fails with DistStoreError: no replacement could ever join.
  A is never preempted, for either: torchrun's c10d store lives in agent A (it is started first and
  must be listening before the others start), and losing it ends a torchrun job; ours has no such
  node, but A is spared too so that both replay the same faults. Both get `--rdzv-conf
  last_call_timeout=--last-call` (torchrun's default is 30 s, ours 3 s) and `--max-restarts 1000`.

Figures, per launcher, from the lines the training script prints (its own clock), not the launchers':

  t_step        mean undisturbed step time: (time between the first and last STEP) / (steps between
                them) over a `--warmup` s window at full size, just before t0, same launcher.
  useful steps  progress that survived the window [t0, t0 + duration]: S_end - S_start, where
                S_start is the step of the last STEP printed at or before t0, and S_end the step of
                the last STEP printed at or before the end, unless the job then rolls back: after the
                end the benchmark waits for the next STEP (no more faults) and S_end is at most that
                step's number minus one. (A job that prints no step again counts its last checkpoint.)
  goodput       useful steps x t_step / duration: the fraction of an undisturbed run's progress the
                job kept. It can exceed 1 when a smaller world steps faster than the full one (2 cores).
  steps/min     useful steps per minute of wall time, next to the undisturbed rate 60 / t_step.
  recomputed    steps trained more than once: STEP lines whose number is not above the highest
                printed before them (a step printed again after a rollback). Each is charged to the
                change that led to the world it was retrained in (the first one when a restart folded
                several, e.g. a kill and a replacement's start), else to the latest event before it.
  gaps          steps skipped: a STEP more than one above the highest step so far, where that highest
                counts the step each world starts from (its ENTER: steps a stopped process committed
                but had no time to print are trained, not skipped; shown as "not printed"). Must be 0.
                The sampler takes every step's batch from the committed cursor, so no gap means no
                sample was skipped (samples lost are not counted directly).
  to new world  preemption: from its reference time (ours: the notice; torchrun: the kill, since
                nothing happens before it) to the first STEP of the first world entered after it that
                does not hold the node; replacement: from its start to the first STEP of the first world
                that holds it. `*` when another scheduled event fell inside that interval. A node
                preempted before its workers ever entered a world has nothing to measure (shown, not
                in the medians).
  stall         the longest time between two consecutive STEPs from the last step before the
                reference time to that first step in the new world: the training time the user lost.

    python benchmarks/spot.py [--seed 1] [--nodes 3] [--mean-interval 40] [--notice 5] \
        [--replace-after 5] [--duration 120] [--reps 1] [--launchers ours,torchrun] [--keep-logs]

Every process it starts is ended by it (also on Ctrl-C or SIGTERM), and its temporary directory is
removed unless --keep-logs is given or our launcher misbehaved (then its path is printed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rescale import free_port, kill_tree, last_error  # noqa: E402
from rescale_train import Line, machine, read_lines  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "benchmarks" / "spot_train.py"
COMMIT_EVERY = 5
TRAIN_ARGS = ["--commit-every", str(COMMIT_EVERY), "--step-sleep", "0.05"]  # never ends by itself
# -> our --rescale-mode. torchrun runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see the docstring);
# torchrun-shared without it, to show what a node joining does to torchrun's default.
LAUNCHERS = {"ours": "auto", "ours-restart": "restart", "torchrun": None, "torchrun-shared": None}
BASE = "ours"
SLOTS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_RESTARTS = 1000
POLL_S = 0.05
LINES_POLL_S = 0.5
ETCD_START_TIMEOUT_S = 30.0
RECOVERY_LIMIT_S = 60.0  # a change with no step in its new world after this long has no result
MEMBER_SLACK_S = 5.0  # a rank's MEMBER line belongs to the world whose rank-0 ENTER is nearest, within this
MEMBER = re.compile(r"\bMEMBER (\d+(?:\.\d+)?) node=(\S+) rank=(\d+) world=(\d+)")


class Interrupted(Exception):
    """SIGTERM/SIGHUP to the benchmark: clean up as for Ctrl-C."""


# -- the schedule ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preemption:
    slot: str
    node: str                   # the agent preempted: B, or a replacement B2, B3, ...
    notice_at: float            # seconds after t0
    kill_at: float              # the deadline
    replacement: Optional[str]  # the node started in its place, if before the end
    start_at: Optional[float]


def node_name(slot: str, generation: int) -> str:
    return slot if generation == 1 else f"{slot}{generation}"


def make_schedule(seed: int, nodes: int, mean_interval: float, notice: float, replace_after: float,
                  duration: float) -> list[Preemption]:
    """Each slot but the first draws its own stream (seeded by seed and slot), so the schedule of
    slot B does not depend on --nodes."""
    out = []
    for slot in SLOTS[1:nodes]:
        rng = random.Random(f"spot:{seed}:{slot}")
        up, generation = 0.0, 1
        while True:
            notice_at = up + rng.expovariate(1.0 / mean_interval)
            kill_at = notice_at + notice
            if kill_at >= duration:
                break
            start_at = kill_at + replace_after
            if start_at >= duration:
                out.append(Preemption(slot, node_name(slot, generation), notice_at, kill_at, None, None))
                break
            out.append(Preemption(slot, node_name(slot, generation), notice_at, kill_at,
                                  node_name(slot, generation + 1), start_at))
            up, generation = start_at, generation + 1
    return sorted(out, key=lambda p: p.notice_at)


@dataclass(frozen=True, order=True)
class Action:
    at: float
    order: int  # notice, kill, start: in this order at equal times
    kind: str
    node: str
    index: int  # of the preemption in the schedule


def actions(schedule: list[Preemption]) -> list[Action]:
    out = []
    for i, p in enumerate(schedule):
        out.append(Action(p.notice_at, 0, "notice", p.node, i))
        out.append(Action(p.kill_at, 1, "kill", p.node, i))
        if p.replacement is not None:
            out.append(Action(p.start_at, 2, "start", p.replacement, i))
    return sorted(out)


def print_schedule(schedule: list[Preemption], seed: int, args: argparse.Namespace) -> None:
    print(f"\nSchedule (seed {seed}): {len(schedule)} preemption(s) in {args.duration:g} s; "
          f"times in s after t0 (end of warm-up)")
    rows = [[f"{a.at:.1f}", a.node, {"notice": f"preemption notice ({args.notice:g} s)",
                                     "kill": "deadline: SIGKILL of its tree if still alive",
                                     "start": "replacement node starts"}[a.kind]]
            for a in actions(schedule)]
    print_table(["t", "node", "action"], rows or [["-", "-", "(no preemption in this window)"]])


# -- one job under one launcher -------------------------------------------------------------------

class Failed(Exception):
    """The job could not be brought up (etcd did not start, the job never reached full size)."""


@dataclass
class Done:
    """What the benchmark actually did for one preemption (unix times)."""

    notice: Optional[float] = None
    kill: Optional[float] = None
    alive_at_kill: Optional[bool] = None
    start: Optional[float] = None


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


# -- what the lines say ---------------------------------------------------------------------------

@dataclass
class Change:
    """One scheduled change as the job lived it."""

    label: str                   # "preempt B", "start B2"
    ref: Optional[float]         # unix time the change is measured from
    kind: str                    # preempt or join
    node: str = ""
    world: str = ""              # "3->2"
    to_new: Optional[float] = None
    stall: Optional[float] = None
    overlapped: bool = False
    recomputed: int = 0
    what: str = ""
    pending: bool = False        # no step in a new world yet, still within the limit
    skip: bool = False           # nothing to measure: a node preempted before it ever joined
    new_enter: Optional[float] = None  # rank 0's ENTER time of the world it led to


@dataclass
class Result:
    launcher: str
    t_step: float
    duration: float
    changes: list
    scheduled: int = 0           # preemptions in the schedule
    useful: Optional[int] = None
    s_start: Optional[int] = None
    s_end: Optional[int] = None
    end_note: str = ""
    recomputed: int = 0
    unattributed: int = 0
    gaps: int = 0
    unprinted: int = 0
    after_end: Optional[Line] = None
    exits: dict = field(default_factory=dict)  # agent -> why it exited unasked
    failure: str = ""
    load: str = ""               # the machine's 1-min load average at t0 and at the end

    @property
    def pending(self) -> bool:
        return any(c.pending for c in self.changes)

    @property
    def goodput(self) -> Optional[float]:
        return None if self.useful is None else self.useful * self.t_step / self.duration

    @property
    def per_min(self) -> Optional[float]:
        return None if self.useful is None else self.useful * 60.0 / self.duration

    def preemptions(self) -> list:
        return [c for c in self.changes if c.kind == "preempt" and not c.skip]

    def joins(self) -> list:
        return [c for c in self.changes if c.kind == "join" and not c.skip]


@dataclass(frozen=True, order=True)
class Member:
    time: float
    node: str
    rank: int
    world: int


def read_members(files: list[Path]) -> list[Member]:
    """Every MEMBER line (one per rank per entry into a world), once each, in time order."""
    found = set()
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for ts, node, rank, world in MEMBER.findall(text):
            found.add(Member(float(ts), node, int(rank), int(world)))
    return sorted(found)


@dataclass
class World:
    """One world the job entered: rank 0's ENTER, the nodes whose ranks entered it, its first STEP."""

    enter: Line
    nodes: set
    first: Optional[Line] = None


def worlds_of(lines: list[Line], members: list[Member]) -> list[World]:
    enters = [x for x in lines if x.kind == "ENTER"]
    worlds = [World(e, set()) for e in enters]
    for m in members:  # every rank enters at about the same time as rank 0 (resume is collective)
        near = [w for w in worlds if w.enter.world == m.world and abs(w.enter.time - m.time) <= MEMBER_SLACK_S]
        if near:
            min(near, key=lambda w: abs(w.enter.time - m.time)).nodes.add(m.node)
    steps = [x for x in lines if x.kind == "STEP"]
    for i, w in enumerate(worlds):
        until = worlds[i + 1].enter.time if i + 1 < len(worlds) else math.inf
        w.first = next((x for x in steps if w.enter.time <= x.time < until and x.world == w.enter.world), None)
    return worlds


def analyse(launcher: str, lines: list[Line], members: list[Member], schedule: list[Preemption],
            done: list[Done], t0: float, t_end: float, t_step: float, exits: Optional[dict] = None,
            event_logs: Optional[dict] = None, final: bool = True) -> Result:
    """The figures of one job from its lines. final=False (while draining): a change whose new world
    has not been seen yet, within RECOVERY_LIMIT_S, is `pending`."""
    steps = [x for x in lines if x.kind == "STEP"]
    worlds = worlds_of(lines, members)
    now = time.time()
    result = Result(launcher, t_step, t_end - t0, [], scheduled=len(schedule), exits=dict(exits or {}))

    changes = []
    own_ref: dict = {}  # node -> the reference time of its own preemption
    for p, d in zip(schedule, done):
        ref = d.notice if launcher.startswith("ours") else d.kill
        if ref is not None:
            own_ref[p.node] = ref
        if not launcher.startswith("ours"):
            what = "SIGKILL at deadline (no notice channel)" if d.kill else "not reached"
        else:
            outcome = next((e["outcome"] for e in (event_logs or {}).get(p.node, [])
                            if e.get("event") == "node_left" and "outcome" in e), None)
            what = (f"left: {outcome}" if outcome else "no node_left event of its own") + \
                ("; SIGKILLed at deadline (still alive)" if d.alive_at_kill else "; gone by the deadline"
                 if d.kill else "")
        changes.append(Change(f"preempt {p.node}", ref, "preempt", node=p.node, what=what))
        if p.replacement is not None:
            what = "replacement started"
            joined = [e["time"] for e in (event_logs or {}).get(p.replacement, []) if e.get("event") == "joined"]
            if joined and d.start is not None:
                what += f"; registered after {joined[0] - d.start:.1f} s"
                if any(e.get("event") == "joined" and e.get("cause") == "prewarmed"
                       for e in event_logs.get(p.replacement, [])):
                    what += " (pre-warmed)"
            changes.append(Change(f"start {p.replacement}", d.start, "join", node=p.replacement, what=what))
    changes = [c for c in changes if c.ref is not None]
    changes.sort(key=lambda c: c.ref)
    refs = [c.ref for c in changes]

    for c in changes:
        current = [w for w in worlds if w.enter.time <= c.ref]
        if not current:
            c.what += "; no world before it"
            continue
        old = current[-1]
        limit = c.ref + RECOVERY_LIMIT_S
        if c.kind == "preempt":
            if c.node not in old.nodes:
                c.skip = True
                c.what += "; it was in no world yet: nothing to recover"
                continue
            new = next((w for w in worlds if c.ref < w.enter.time <= limit and c.node not in w.nodes), None)
        else:
            new = next((w for w in worlds if c.ref < w.enter.time <= limit and c.node in w.nodes), None)
        if new is None or new.first is None:
            own = own_ref.get(c.node) if c.kind == "join" else None
            if own is not None and own <= now and (new is None or new.enter.time > own):
                c.skip = True
                c.what += f"; preempted {own - c.ref:.1f} s after its start, before it trained"
            elif not final and now < limit:
                c.pending = True
            else:
                c.what += f"; no step in a new world (waited {min(now, limit) - c.ref:.0f} s)"
            continue
        c.new_enter = new.enter.time
        c.world = f"{old.enter.world}->{new.enter.world}"
        c.to_new = new.first.time - c.ref
        before = [x for x in steps if x.time <= c.ref]
        times = [x.time for x in before[-1:]] + [x.time for x in steps if c.ref < x.time <= new.first.time]
        c.stall = max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else 0.0
        c.overlapped = any(c.ref < r < new.first.time for r in refs)

    # Progress: rollbacks and gaps over the STEP sequence from t0 on.
    start = [x for x in steps if x.time <= t0]
    if not start:
        result.failure = "no step before t0"
        result.changes = changes
        return result
    result.s_start = start[-1].step
    highest = result.s_start
    for x in (x for x in lines if x.time > t0):
        if x.kind == "ENTER":
            # A world that starts from a state past the highest step printed: those steps were
            # trained (they are in the state it resumed from), but the process that trained them
            # was stopped between its commit and its STEP line.
            if x.step > highest:
                result.unprinted += x.step - highest
                highest = x.step
            continue
        if x.step <= highest:  # this step was trained before
            n = 1
            result.recomputed += n
            # Charged to the change that led to the world this step was retrained in (the first of
            # them when several, e.g. a kill and a join, were folded into one restart), else to the
            # latest change before it.
            into = [w for w in worlds if w.enter.time <= x.time]
            owner = [c for c in changes if into and c.new_enter == into[-1].enter.time] or \
                [c for c in changes if c.ref <= x.time][-1:]
            if owner:
                owner[0].recomputed += n
            else:
                result.unattributed += n
        elif x.step > highest + 1:
            result.gaps += x.step - highest - 1
        highest = max(highest, x.step)

    last = [x for x in steps if x.time <= t_end][-1]
    result.after_end = next((x for x in steps if x.time > t_end), None)
    if result.after_end is not None:
        result.s_end = min(last.step, result.after_end.step - 1)
        if result.s_end < last.step:
            result.end_note = (f"at the end it was recovering: last step before the end {last.step}, "
                               f"next step after it {result.after_end.step}")
    else:
        result.s_end = (last.step // COMMIT_EVERY) * COMMIT_EVERY
        result.end_note = f"no step after the end: counted its last checkpoint, step {result.s_end}"
    result.useful = result.s_end - result.s_start
    result.changes = changes
    return result


# -- the report -----------------------------------------------------------------------------------

def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def secs(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f} s"


def median(values: list) -> Optional[float]:
    """Median where a missing figure (no recovery) sorts after every number; None if it lands there."""
    vals = [math.inf if v is None else v for v in values]
    if not vals:
        return None
    m = statistics.median(vals)
    return None if math.isinf(m) else m


def print_result(r: Result, rep: int) -> None:
    if math.isnan(r.t_step):
        print(f"\n[{r.launcher}, rep {rep}]")
    else:
        print(f"\n[{r.launcher}, rep {rep}] t_step {r.t_step * 1000:.0f} ms undisturbed "
              f"({60 / r.t_step:.0f} steps/min)")
    if r.failure:
        print(f"  NO RESULT: {r.failure}")
    rows = []
    for c in r.changes:
        rows.append([c.label, c.world or "-", secs(c.to_new) + ("*" if c.overlapped else ""),
                     secs(c.stall), str(c.recomputed), c.what + (" (not in medians)" if c.skip else "")])
    if rows:
        print_table(["change", "world", "to new world", "stall", "recomputed", "what happened"], rows)
    if any(c.overlapped for c in r.changes):
        print("  * another scheduled event fell inside this interval")
    for name, why in r.exits.items():
        print(f"  UNEXPECTED: agent {name} exited with code {why}")
    if r.useful is not None:
        print(f"  useful steps {r.useful} (step {r.s_start} -> {r.s_end}{'; ' + r.end_note if r.end_note else ''}); "
              f"{r.per_min:.0f} surviving steps/min vs {60 / r.t_step:.0f} undisturbed; goodput {r.goodput:.1%}; "
              f"recomputed {r.recomputed}" + (f" ({r.unattributed} before any event)" if r.unattributed else "")
              + f"; gaps {r.gaps}" + (f" ({r.unprinted} step(s) trained but not printed)" if r.unprinted else "")
              + f"; 1-min load average at t0 / end {r.load}")


def summary_figures(results: list[Result]) -> dict:
    pre = [c for r in results for c in r.preemptions()]
    joins = [c for r in results for c in r.joins()]
    n_pre = sum(r.scheduled for r in results)  # the same for every launcher
    total_rec = sum(r.recomputed for r in results)
    return {
        # A run that never got going kept nothing: 0, not a missing figure.
        "goodput": median([r.goodput or 0.0 for r in results]),
        "per_min": median([r.per_min or 0.0 for r in results]),
        "undisturbed": median([60 / r.t_step for r in results if not math.isnan(r.t_step)]),
        "useful": median([r.useful or 0 for r in results]),
        "rec_per_pre": total_rec / n_pre if n_pre else None,
        "rec_median": median([c.recomputed for c in pre]),
        "pre_to_new": median([c.to_new for c in pre]),
        "pre_stall": median([c.stall for c in pre]),
        "join_to_new": median([c.to_new for c in joins]),
        "join_stall": median([c.stall for c in joins]),
        "gaps": sum(r.gaps for r in results),
        "n_pre": n_pre, "n_join": len(joins), "recomputed": total_rec,
        "failed": sum(1 for r in results if r.failure),
    }


def fmt(key: str, v: Optional[float]) -> str:
    if v is None:
        return "no result"
    if key == "goodput":
        return f"{v:.1%}"
    if key in ("per_min", "undisturbed", "useful", "gaps", "recomputed"):
        return f"{v:.0f}"
    if key in ("rec_per_pre", "rec_median"):
        return f"{v:.1f}"
    return f"{v:.2f} s"


ROWS = [("goodput", "goodput (useful steps x t_step / wall)"),
        ("per_min", "surviving steps per minute of wall time"),
        ("undisturbed", "undisturbed steps per minute (warm-up)"),
        ("useful", "useful steps"),
        ("recomputed", "steps recomputed, total"),
        ("rec_per_pre", "steps recomputed per scheduled preemption (all / preemptions)"),
        ("rec_median", "steps recomputed charged to a preemption, median"),
        ("pre_to_new", "preemption -> first step in a world without the node, median"),
        ("pre_stall", "stall per preemption, median"),
        ("join_to_new", "replacement start -> first step in a world with it, median"),
        ("join_stall", "stall per replacement join, median"),
        ("gaps", "steps skipped (gaps; 0 = no sample lost)")]


def report(results: dict[str, list[Result]], args: argparse.Namespace) -> None:
    launchers = list(results)
    figs = {name: summary_figures(rs) for name, rs in results.items() if rs}
    print(f"\nMachine: {machine()}; shared: 1-min load average at t0 / end of each run: " + ", ".join(
        f"{n} {r.load}" for n, rs in results.items() for r in rs if r.load) + ".")
    print(f"{args.reps} repetition(s), launchers in the order {', '.join(launchers)}; each: "
          f"{args.duration:g} s of replayed schedule after a {args.warmup:g} s undisturbed warm-up at "
          f"{args.nodes} nodes; medians over preemptions/joins of all repetitions.")
    print(f"Notice {args.notice:g} s and mean interval {args.mean_interval:g} s are scaled down for a "
          f"benchmark: clouds give 30 s (GCE) to 2 min (AWS) of notice, and preempt after hours.")
    print("Node A is never preempted: for torchrun it hosts the c10d store, and preempting it would end "
          "the job; ours has no such node, but A is spared for it too so that both replay the same faults.")
    print("torchrun gets nothing at notice time (no notice channel) and its node is SIGKILLed at the "
          "deadline; ours gets its notice file at notice time and is SIGKILLed at the deadline only if "
          "still alive.")
    header = ["figure", *launchers]
    rows = [[label, *[fmt(key, figs[n][key]) if n in figs else "no result" for n in launchers]]
            for key, label in ROWS]
    failed = [f"{n} {f['failed']} of {args.reps}" for n, f in figs.items() if f["failed"]]
    if failed:
        print("Runs that never reached full size and count as goodput 0: " + ", ".join(failed))
    print()
    print_table(header, rows)
    others = [n for n in launchers if n != BASE and n in figs]
    if BASE in figs:
        for n in others:
            g_b, g_o = figs[BASE]["goodput"], figs[n]["goodput"]
            s_b, s_o = figs[BASE]["pre_stall"], figs[n]["pre_stall"]
            parts = [f"goodput {BASE}/{n} " + (f"{g_b / g_o:.2f}x" if g_b and g_o else "n/a"),
                     f"stall per preemption {n}/{BASE} " + (f"{s_o / s_b:.1f}x" if s_b and s_o else "n/a")]
            print("ratio: " + "; ".join(parts))
    summary = [f"{n}: goodput {fmt('goodput', f['goodput'])}, {fmt('per_min', f['per_min'])} surviving "
               f"steps/min (undisturbed {fmt('undisturbed', f['undisturbed'])}), recomputed/preemption "
               f"{fmt('rec_per_pre', f['rec_per_pre'])}, stall/preemption {fmt('pre_stall', f['pre_stall'])}, "
               f"gaps {f['gaps']}" for n, f in figs.items()]
    n_pre = next(iter(figs.values()))["n_pre"] if figs else 0
    ok = None
    if BASE in figs:
        f = figs[BASE]
        ok = f["gaps"] == 0 and f["recomputed"] == 0 and not any(r.exits for r in results[BASE])
    verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[ok]
    print(f"\nSUMMARY ({os.cpu_count()} cores, CPU only, seed {args.seed}, {n_pre} preemption(s) with "
          f"{args.notice:g} s notice in {args.reps} x {args.duration:g} s, median) " + "; ".join(summary)
          + f". ours recomputes no step, skips none and no agent of it crashed: {verdict}")


# -- main -------------------------------------------------------------------------------------------

def run_one(launcher: str, job_dir: Path, schedule: list[Preemption], args) -> Result:
    with Job(launcher, job_dir, args) as job:
        try:
            t0, t_step = job.bring_up()
        except Failed as exc:
            return Result(launcher, math.nan, args.duration, [], scheduled=len(schedule), failure=str(exc))
        print(f"  {launcher}: t0 reached, t_step {t_step * 1000:.0f} ms; replaying", flush=True)
        load_t0 = os.getloadavg()[0]
        done = job.replay(schedule, t0)
        load = f"{load_t0:.1f} / {os.getloadavg()[0]:.1f}"
        job.drain(schedule, done, t0, t_step)
        job.check_agents()
        names = [n for p in schedule for n in (p.node, p.replacement) if n]
        exits = {name: f"{code}: {last_error(job.agent_log(name))}" for name, code in job.exits.items()}
        result = analyse(launcher, job.lines(), job.members(), schedule, done, t0, t0 + args.duration, t_step,
                         exits=exits, event_logs={n: job.events(n) for n in names} if job.ours else None)
        result.load = load
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=3, help="agents of one worker each (default 3)")
    parser.add_argument("--mean-interval", type=float, default=40.0,
                        help="mean seconds a node lives before its preemption notice (exponential)")
    parser.add_argument("--notice", type=float, default=5.0, help="seconds from notice to the kill")
    parser.add_argument("--replace-after", type=float, default=5.0,
                        help="seconds from the kill to the start of a replacement node")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of schedule per launcher")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of undisturbed training at full size that measure t_step")
    parser.add_argument("--last-call", type=int, default=1,
                        help="last_call_timeout (whole s) for both rendezvous (torchrun's default 30, ours 3)")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--launchers", default="ours,torchrun", help=f"comma list of: {', '.join(LAUNCHERS)}")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs' temporary directory")
    args = parser.parse_args()
    launchers = [n.strip() for n in args.launchers.split(",") if n.strip()]
    if not launchers or set(launchers) - set(LAUNCHERS) or len(set(launchers)) != len(launchers):
        parser.error(f"--launchers takes some of {', '.join(LAUNCHERS)}, comma-separated")
    if not 2 <= args.nodes <= len(SLOTS):
        parser.error("--nodes must be 2 to 26")
    if min(args.mean_interval, args.duration, args.warmup) <= 0 or min(args.notice, args.replace_after) < 0 \
            or args.reps < 1 or args.last_call < 1:
        parser.error("times must be positive, --reps and --last-call at least 1")

    def interrupt(signum, _frame):
        # Once: a second signal must not cut short the clean-up the first one starts.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    schedules = [make_schedule(args.seed + rep, args.nodes, args.mean_interval, args.notice,
                               args.replace_after, args.duration) for rep in range(args.reps)]
    for rep, schedule in enumerate(schedules):
        print_schedule(schedule, args.seed + rep, args)
    log_root = Path(tempfile.mkdtemp(prefix="spot-bench-"))
    print(f"\nLogs: {log_root}", flush=True)
    keep = args.keep_logs
    results: dict[str, list[Result]] = {n: [] for n in launchers}
    try:
        for rep, schedule in enumerate(schedules, 1):
            for name in launchers:
                print(f"rep {rep}/{args.reps} {name}: starting {args.nodes} nodes", flush=True)
                r = run_one(name, log_root / f"rep{rep}-{name}", schedule, args)
                results[name].append(r)
                print_result(r, rep)
                sys.stdout.flush()
                if name.startswith("ours") and (r.failure or r.exits or r.gaps or r.pending
                                           or any(c.recomputed for c in r.preemptions())):
                    keep = True
        report(results, args)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({str(exc) or 'Ctrl-C'}): every process this benchmark started was stopped", flush=True)
        keep = args.keep_logs
        raise SystemExit(130)
    finally:
        if keep:
            print(f"Logs kept in {log_root}")
        else:
            shutil.rmtree(log_root, ignore_errors=True)


if __name__ == "__main__":
    main()
