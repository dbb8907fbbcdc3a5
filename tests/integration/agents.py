"""Running launcher agents as separate processes, the way users and tests see them."""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from tests.support import kill_tree, read_events  # noqa: F401 (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]
STEPS = Path(__file__).resolve().parent / "scripts" / "steps.py"
OUTPUT_TAIL_CHARS = 4000

# The agents the running test started: a failing test's report shows the end of each one's
# output (tests/conftest.py), which is all there is to go on when it fails on a CI machine.
STARTED = []


class Agent:
    """One `python -m elastic.run` process; output goes to <tmp>/<name>.out."""

    def __init__(self, args, tmp_path, name, mark, env=None, prefix=()):
        """prefix: a command the agent runs under (e.g. `ip netns exec NS`, which execs it in
        place, so the agent keeps the pid of the process started here)."""
        self.name = name
        self.out = Path(tmp_path) / f"{name}.out"
        full_env = dict(os.environ, PYTHONPATH=str(REPO), ELASTIC_TEST_MARK=mark, **(env or {}))
        with open(self.out, "wb") as sink:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "elastic.run", *[str(a) for a in args]],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env=full_env, start_new_session=True)
        STARTED.append(self)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def output_tail(self) -> str:
        try:
            return self.output()[-OUTPUT_TAIL_CHARS:]
        except OSError as exc:
            return f"(no output: {exc})"

    def kill_node(self) -> None:
        """A node's death: the agent and every process under it, whatever their session."""
        kill_tree(self.proc)

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout=60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill_node()


def new_mark() -> str:
    return uuid.uuid4().hex


def processes_with_mark(mark):
    """Live processes that inherited ELASTIC_TEST_MARK=mark (workers, etcd, agents)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("ELASTIC_TEST_MARK") == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def workers_of(agent_pid: int) -> list:
    """An agent's worker processes: those its zygote forked (launcher/zygote.py) and those it
    started itself, not its etcd."""
    found = []
    for child in psutil.Process(agent_pid).children():
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "launcher.zygote" in command:
            found += child.children()
        elif command and not os.path.basename(command[0]).startswith("etcd"):
            found.append(child)
    return found


def wait_for(predicate, timeout=60.0, interval=0.1, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def worlds_started(log_dir, node=None):
    """World sizes of the rounds workers were started in, in order (per node if given)."""
    return [e["world_size"] for e in read_events(log_dir)
            if e["event"] in ("rendezvous", "rescale") and (node is None or e["node"] == node)]
