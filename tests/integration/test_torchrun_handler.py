"""Plain torchrun with `--rdzv-backend elastic-etcd`: agents as separate processes on 127.0.0.1."""
import os
import re
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from .agents import REPO, wait_for

pytestmark = pytest.mark.integration

# Each worker appends one line per step to <out>/rank<RANK>.txt: "<world> <restart>" and stops
# once the stop file exists (agreed by all-reduce, so no rank is left in a collective).
SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    import torch.distributed as dist

    out, stop_file, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == int(os.environ["WORLD_SIZE"]), (world, os.environ["WORLD_SIZE"])
    step = 0
    while True:
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)
        assert total.item() == world * (world + 1) / 2, total
        with open(os.path.join(out, f"rank{rank}.txt"), "a") as f:
            f.write(f"{world} {os.environ['GROUP_RANK']}\\n")
        step += 1
        done = torch.tensor([1.0 if (steps and step >= steps) or os.path.exists(stop_file) else 0.0])
        dist.all_reduce(done)
        if done.item() > 0:
            break
        time.sleep(0.05)
    dist.destroy_process_group()
""")


class Torchrun:
    """One `python -m torch.distributed.run` agent (one node); output goes to <tmp>/<name>.out."""

    def __init__(self, tmp_path, name, etcd, run_id, nnodes, script_args, rdzv_conf=""):
        self.out = tmp_path / f"{name}.out"
        args = ["--rdzv-backend", "elastic-etcd", "--rdzv-endpoint", etcd, "--rdzv-id", run_id,
                "--nnodes", nnodes, "--nproc-per-node", "1", "--monitor-interval", "0.2"]
        if rdzv_conf:
            args += ["--rdzv-conf", rdzv_conf]
        with open(self.out, "wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *args, *map(str, script_args)],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait(self, timeout) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun did not exit within {timeout}s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL the agent and every process under it."""
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)


def lines(out_dir, rank):
    path = out_dir / f"rank{rank}.txt"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def job(tmp_path, etcd_endpoint, run_id):
    script = tmp_path / "allreduce.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    agents = []

    def start(name, nnodes, steps, rdzv_conf=""):
        agents.append(Torchrun(tmp_path, name, etcd_endpoint, run_id, nnodes,
                               [script, out, tmp_path / "stop", steps], rdzv_conf))
        return agents[-1]

    start.out, start.stop = out, tmp_path / "stop"
    try:
        yield start
    finally:
        for agent in agents:
            agent.kill()


def test_two_torchrun_agents_form_one_world(job):
    a, b = job("a", "2", steps=5), job("b", "2", steps=5)
    assert a.wait(90) == 0, a.output()
    assert b.wait(30) == 0, b.output()
    for rank in (0, 1):
        seen = lines(job.out, rank)
        assert len(seen) == 5, seen
        assert {line.split()[0] for line in seen} == {"2"}
    # One node per group rank: ranks 0 and 1 ran on different agents.
    assert {lines(job.out, r)[0].split()[1] for r in (0, 1)} == {"0", "1"}


def test_a_joining_agent_grows_the_world(job):
    conf = "last_call_timeout=0.5,join_settle=0.3"
    a = job("a", "1:2", steps=0, rdzv_conf=conf)
    wait_for(lambda: lines(job.out, 0), timeout=60, what="agent a training alone")
    assert {line.split()[0] for line in lines(job.out, 0)} == {"1"}
    b = job("b", "1:2", steps=0, rdzv_conf=conf)
    wait_for(lambda: len(lines(job.out, 1)) >= 3, timeout=60, what="a world of two")
    job.stop.touch()
    assert a.wait(60) == 0, a.output()
    assert b.wait(30) == 0, b.output()
    worlds = [int(line.split()[0]) for line in lines(job.out, 0)]
    assert worlds[0] == 1 and worlds[-1] == 2 and worlds == sorted(worlds), worlds
    # Growing is a membership change, not a worker failure: no restart was spent.
    assert not re.search(r"attempts left", a.output() + b.output())
