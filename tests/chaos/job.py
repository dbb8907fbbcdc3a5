"""A chaos run: the job's own etcd, its agents, the pacing of training and the faults injected.

Pacing. Training is cut into slots of SLOT_STEPS steps with the allowance file of
tests/integration/scripts/fixed_train.py. While fault i is prepared and recovered from, the job
may train up to step (i + 2) * SLOT_STEPS; fault i is injected once rank 0 has trained step
inject_step(i) - 1, so faults land while the ranks are stepping, and the new world still has
steps left to train when it forms (that is what recovery times are measured on).

Hangs are fixed in advance, since fixed_train.py takes them on its command line: every agent
gets `--hang-at inject_step(i)` for each hang fault i, and rank 1 stops making progress when the
job first reaches that step. Step inject_step(i) is above every earlier allowance, so it is
reached only in fault i's slot, once the world before it has settled (with >= 2 ranks).

A fault has settled when rank 0 has started training in the world that should follow it (a
`RESUMED ... world=W rank=0` line after the fault), and for an etcd restart when every running
agent has logged `etcd_reconnected`; only then is the next slot allowed.
"""
from __future__ import annotations

import codecs
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from rendezvous.embedded import EmbeddedEtcd
from tests.integration.agents import REPO, Agent, read_events

from . import schedule as sched
from tests.support import quiet_port

SCRIPT = "tests/integration/scripts/fixed_train.py"
DATASET, GLOBAL_BATCH, MAX_MICRO_BATCH = 200, 10, 4
SAMPLER_SEED = 3  # fixed_train.py's ElasticSampler seed (and its global batch is GLOBAL_BATCH)
STEPS_PER_EPOCH = DATASET // GLOBAL_BATCH
SLOT_STEPS, INJECT_OFFSET = 16, 6
# blacklist_after=0: hangs hit whichever node holds rank 1; two on one node would cool it down
# for a minute and the worlds the schedule expects would not form. Blacklisting has its own tests.
RDZV_CONF = "last_call_timeout=0.5,join_settle=0.2,lease_ttl=10,blacklist_after=0"
HANG_TIMEOUT_S, MAX_RESTARTS = 4, 100
ETCD_DOWN_S = 2.0
SETTLE_TIMEOUT_S = 120.0
POLL_S = 0.1

STEP_LINE = re.compile(r"STEP (\d+\.\d+) step=(\d+) world=(\d+) rank=0\b")
HANG_LINE = re.compile(r"HANG (\d+\.\d+) step=(\d+) rank=1\b")


def resumed_line(world: int) -> re.Pattern:
    return re.compile(rf"RESUMED step=\d+ epoch=\d+ cursor=\d+ world={world} rank=0 ")


def inject_step(index: int) -> int:
    return (index + 1) * SLOT_STEPS + INJECT_OFFSET


def epochs_for(faults: int) -> int:
    """Enough epochs that training outlasts the last fault's slot."""
    return -(-(faults + 3) * SLOT_STEPS // STEPS_PER_EPOCH)


def launcher_has(flag: str) -> bool:
    text = subprocess.run([sys.executable, "-m", "elastic.run", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout
    return flag in text



@dataclass
class Injected:
    """One fault as it happened."""
    index: int
    kind: str
    target: Optional[str]     # agent name (join, removals)
    node: Optional[str]       # its node id; for a hang, the node whose worker hung
    time: float               # unix time the fault hit
    world: int                # world size expected after it
    exit_code: Optional[int]  # of the agent a sigterm or preempt made leave


class ChaosJob:
    """Runs one job through a schedule. Files: <tmp>/<agent>.out, logs/events.jsonl, records/."""

    def __init__(self, tmp: Path, run_id: str, mark: str, plan: sched.Schedule, epochs: int,
                 preemption_files: bool):
        self.tmp, self.run_id, self.mark, self.plan = tmp, run_id, mark, plan
        self.epochs, self.preemption_files = epochs, preemption_files
        self.logs, self.records = tmp / "logs", tmp / "records"
        self.records.mkdir(parents=True)
        self.allowance, self.checkpoint = tmp / "allowance", tmp / "state.ckpt"
        self.params = tmp / "params.pt"
        self.hang_at = [inject_step(i) for i, f in enumerate(plan.faults) if f.kind == sched.HANG]
        self.etcd = EmbeddedEtcd(port=quiet_port(), data_dir=str(tmp / "etcd"))
        self.endpoint = ""
        self.agents: Dict[str, Agent] = {}
        self.nodes: Dict[str, str] = {}  # agent name -> node id
        self.running: Tuple[str, ...] = ()
        self.injected: List[Injected] = []
        self._read: Dict[str, int] = {}  # agent name -> bytes of its output read so far
        self._decoders: Dict[str, codecs.IncrementalDecoder] = {}
        self._text: Dict[str, str] = {}
        self.allow(0)

    # -- the pieces ---------------------------------------------------------------------------
    def allow(self, steps: int) -> None:
        tmp = self.allowance.with_suffix(".tmp")
        tmp.write_text(str(steps))
        tmp.replace(self.allowance)

    def start_etcd(self) -> None:
        self.endpoint = self.etcd.start()

    def restart_etcd(self) -> None:
        self.etcd.stop()
        time.sleep(ETCD_DOWN_S)
        self.etcd = EmbeddedEtcd(port=self.etcd.port, data_dir=self.etcd.data_dir)
        self.start_etcd()

    def start_agent(self, name: str) -> Agent:
        """Start an agent and wait for its `joined` event, which names its node."""
        args = ["--nnodes", "1:3", "--nproc-per-node", 1, "--rdzv-endpoint", self.endpoint,
                "--rdzv-id", self.run_id, "--rdzv-conf", RDZV_CONF,
                "--max-restarts", MAX_RESTARTS, "--hang-timeout", HANG_TIMEOUT_S,
                "--log-dir", self.logs, "--global-batch-size", GLOBAL_BATCH,
                "--max-micro-batch", MAX_MICRO_BATCH]
        if self.preemption_files:
            args += ["--preemption-file", self.notice_file(name)]
        args += [SCRIPT, "--checkpoint", self.checkpoint, "--out", self.params,
                 "--record-dir", self.records, "--allowance-file", self.allowance,
                 "--epochs", self.epochs, "--dataset", DATASET]
        for step in self.hang_at:
            args += ["--hang-at", step]
        if self.hang_at:
            args += ["--hang-marker", self.tmp / "hung"]
        known = set(self.nodes.values())
        agent = self.agents[name] = Agent(args, self.tmp, name, self.mark)
        self.nodes[name] = self.wait(
            lambda: next((e["node"] for e in read_events(self.logs)
                          if e["event"] == "joined" and e["node"] not in known), None),
            f"{name} to join")
        return agent

    def notice_file(self, name: str) -> Path:
        return self.tmp / f"{name}.notice"

    def outputs(self) -> Dict[str, str]:
        """Every agent's output so far; read incrementally (a soak's outputs grow long, and
        re-reading them at every poll would take CPU from the training it watches)."""
        for name, agent in self.agents.items():
            with open(agent.out, "rb") as f:
                f.seek(self._read.get(name, 0))
                data = f.read()
            if data:
                self._read[name] = self._read.get(name, 0) + len(data)
                decoder = self._decoders.setdefault(
                    name, codecs.getincrementaldecoder("utf-8")("replace"))
                self._text[name] = self._text.get(name, "") + decoder.decode(data)
        return dict(self._text)

    def positions(self) -> Dict[str, int]:
        return {name: len(text) for name, text in self.outputs().items()}

    def rank0_steps(self, since: Optional[Dict[str, int]] = None):
        """(time, step, world) of every step rank 0 reported (after `since`), in time order."""
        since = since or {}
        return sorted((float(t), int(s), int(w)) for name, text in self.outputs().items()
                      for t, s, w in STEP_LINE.findall(text, since.get(name, 0)))

    def hang_seen(self, step: int, since: Dict[str, int]) -> Optional[Tuple[float, str]]:
        """(time, agent name) of rank 1's HANG line for `step`."""
        for name, text in self.outputs().items():
            for t, s in HANG_LINE.findall(text, since.get(name, 0)):
                if int(s) == step:
                    return float(t), name
        return None

    def wait(self, predicate, what: str, timeout: float = SETTLE_TIMEOUT_S):
        """predicate()'s first true value; fails early when a running agent exits meanwhile."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            dead = [n for n in self.running if self.agents[n].proc.poll() is not None]
            if dead:
                raise AssertionError(f"{dead} exited while waiting for {what}\n{self.evidence()}")
            time.sleep(POLL_S)
        raise AssertionError(f"{timeout:.0f}s passed waiting for {what}\n{self.evidence()}")

    def wait_resumed(self, world: int, since: Dict[str, int], what: str) -> None:
        line = resumed_line(world)
        self.wait(lambda: any(line.search(text, since.get(name, 0))
                              for name, text in self.outputs().items()), what)

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.agents[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still runs after {timeout:.0f}s\n{self.evidence()}")

    def evidence(self, tail: int = 2500) -> str:
        parts = []
        for name, agent in self.agents.items():
            code = agent.proc.poll()
            state = "running" if code is None else f"exit {code}"
            parts.append(f"--- {name} ({state}) node={self.nodes.get(name)}\n"
                         f"{agent.output()[-tail:]}")
        events = "\n".join(str(e) for e in read_events(self.logs)[-40:])
        return "\n".join(parts) + f"\n--- last events\n{events}\n--- files under {self.tmp}"

    # -- the run ------------------------------------------------------------------------------
    def start(self) -> None:
        """The initial agents (etcd must be started), until rank 0 trains in their world."""
        for name in self.plan.initial:
            self.start_agent(name)
        self.running = self.plan.initial
        self.wait_resumed(len(self.running), {}, "the first world")

    def run_faults(self) -> None:
        for index, fault in enumerate(self.plan.faults):
            since = self.positions()
            self.allow((index + 2) * SLOT_STEPS)
            if fault.kind != sched.HANG:
                # Steps this high are trained only once this slot is allowed.
                due = inject_step(index) - 1
                self.wait(lambda: any(s >= due for _, s, _ in self.rank0_steps(since)),
                          f"step {due} before fault {index}")
                since = self.positions()
            self.running = sched.apply(self.running, fault)
            self.injected.append(self.inject(index, fault, since))

    def inject(self, index: int, fault: sched.Fault, since: Dict[str, int]) -> Injected:
        """Apply one fault and wait until the job has settled after it."""
        kind, name, world = fault.kind, fault.target, len(self.running)
        now, code = time.time(), None
        if kind == sched.JOIN:
            self.start_agent(name)
        elif kind == sched.SIGKILL:
            self.agents[name].kill_node()
        elif kind == sched.SIGTERM:
            self.agents[name].signal(signal.SIGTERM)
            code = self.wait_exit(name, 60)
            assert code == 128 + signal.SIGTERM, f"{name} left with {code}\n{self.evidence()}"
        elif kind == sched.PREEMPT:
            notice = self.notice_file(name)
            notice.with_suffix(".tmp").write_text("chaos preemption notice")
            notice.with_suffix(".tmp").replace(notice)
            code = self.wait_exit(name, 120)
        elif kind == sched.HANG:
            now, name = self.wait(lambda: self.hang_seen(inject_step(index), since),
                                  f"rank 1 to hang at step {inject_step(index)}")
        elif kind == sched.ETCD_RESTART:
            self.restart_etcd()
            nodes = {self.nodes[n] for n in self.running}
            self.wait(lambda: nodes <= {e["node"] for e in read_events(self.logs)
                                        if e["event"] == "etcd_reconnected" and e["time"] > now},
                      f"every agent to reconnect after etcd restart {index}")
        if kind != sched.ETCD_RESTART:  # etcd's outage does not change the world
            self.wait_resumed(world, since, f"rank 0 in a world of {world} after fault {index}")
        return Injected(index, kind, fault.target, self.nodes.get(name), now, world, code)

    def finish(self, timeout: float) -> Dict[str, int]:
        """Let training run to its end; the exit code of every agent still running."""
        self.allow(10**9)
        deadline = time.time() + timeout
        return {name: self.wait_exit(name, max(1.0, deadline - time.time()))
                for name in self.running}

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.etcd.stop()
