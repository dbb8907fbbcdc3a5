"""Plain torchrun with `--rdzv-backend elastic-etcd`: agents as separate processes on 127.0.0.1."""
import os
import subprocess
import sys
import textwrap

import pytest

from .agents import REPO, kill_tree, wait_for

pytestmark = pytest.mark.integration

# Each worker appends one line per step to <out>/rank<RANK>.txt, "<world> <group rank> <restart
# count>", after checking an all-reduce across the world; it stops after <steps> steps (0: never) or
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
        restarts = os.environ["TORCHELASTIC_RESTART_COUNT"]
        with open(os.path.join(out, f"rank{rank}.txt"), "a") as f:
            f.write(f"{world} {os.environ['GROUP_RANK']} {restarts}\\n")
        step += 1
        stop = (steps and step >= steps) or os.path.exists(stop_file)
        done = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(done)
        if done.item() > 0:
            break
        time.sleep(0.05)
    dist.destroy_process_group()
""")


class Torchrun:
    """One `python -m torch.distributed.run` agent (one node); output goes to <tmp>/<name>.out."""

    def __init__(self, tmp_path, name, etcd, run_id, nnodes, script_args, rdzv_conf="",
                 max_restarts=0):
        self.out = tmp_path / f"{name}.out"
        args = ["--rdzv-backend", "elastic-etcd", "--rdzv-endpoint", etcd, "--rdzv-id", run_id,
                "--nnodes", nnodes, "--nproc-per-node", "1", "--monitor-interval", "0.2",
                "--max-restarts", str(max_restarts)]
        if rdzv_conf:
            args += ["--rdzv-conf", rdzv_conf]
        with open(self.out, "wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *args, *map(str, script_args)],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO), LOGLEVEL="INFO"), start_new_session=True)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait(self, timeout) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun did not exit within {timeout}s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL the agent and every process under it."""
        kill_tree(self.proc)


class Job:
    """torchrun agents of one job, all running the script above into one output folder."""

    def __init__(self, tmp_path, etcd, run_id):
        self.tmp_path, self.etcd, self.run_id = tmp_path, etcd, run_id
        self.script = tmp_path / "allreduce.py"
        self.script.write_text(SCRIPT)
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.stop_file = tmp_path / "stop"
        self.agents = []

    def start(self, name, nnodes, steps, rdzv_conf="", max_restarts=0):
        agent = Torchrun(self.tmp_path, name, self.etcd, self.run_id, nnodes,
                         [self.script, self.out, self.stop_file, steps], rdzv_conf, max_restarts)
        self.agents.append(agent)
        return agent

    def lines(self, rank):
        """(world, group rank, restart count) of each step rank `rank` took."""
        path = self.out / f"rank{rank}.txt"
        text = path.read_text() if path.exists() else ""
        return [tuple(int(x) for x in line.split()) for line in text.splitlines() if line]


@pytest.fixture
def job(tmp_path, etcd_endpoint, run_id):
    job = Job(tmp_path, etcd_endpoint, run_id)
    try:
        yield job
    finally:
        for agent in job.agents:
            agent.kill()


def test_two_torchrun_agents_form_one_world(job):
    a, b = job.start("a", "2", steps=5), job.start("b", "2", steps=5)
    assert a.wait(90) == 0, a.output()
    assert b.wait(30) == 0, b.output()
    for rank in (0, 1):
        assert [world for world, _, _ in job.lines(rank)] == [2] * 5, job.lines(rank)
    # One node per group rank: global ranks 0 and 1 ran under different agents.
    assert {job.lines(r)[0][1] for r in (0, 1)} == {0, 1}


def test_a_joining_agent_grows_the_world(job):
    conf = "last_call_timeout=0.5,join_settle=0.3"
    a = job.start("a", "1:2", steps=0, rdzv_conf=conf)
    wait_for(lambda: job.lines(0), timeout=60, what="agent a training alone")
    b = job.start("b", "1:2", steps=0, rdzv_conf=conf)
    wait_for(lambda: len(job.lines(1)) >= 3, timeout=60, what="a world of two")
    job.stop_file.touch()
    assert a.wait(60) == 0, a.output()
    assert b.wait(30) == 0, b.output()
    worlds = [world for world, _, _ in job.lines(0)]
    assert worlds[0] == 1 and worlds[-1] == 2 and worlds == sorted(worlds), worlds
    # Growing is a membership change torchrun learns from our num_nodes_waiting, not a worker
    # failure: no restart was spent (the default --max-restarts 0 would have ended the job).
    assert {restarts for r in (0, 1) for _, _, restarts in job.lines(r)} == {0}


def test_a_lost_agent_leaves_by_lease_expiry(job):
    # Its peer's workers fail at once (gloo); with a restart to spend, the survivor's agent asks
    # for a new round, and the round after the dead node's lease expired has it alone.
    conf = "last_call_timeout=0.5,join_settle=0.3,lease_ttl=2"
    a = job.start("a", "1:2", steps=0, rdzv_conf=conf, max_restarts=1)
    b = job.start("b", "1:2", steps=0, rdzv_conf=conf, max_restarts=1)
    wait_for(lambda: len(job.lines(1)) >= 3, timeout=60, what="a world of two")
    b.kill()
    wait_for(lambda: job.lines(0)[-1][0] == 1, timeout=60, what="agent a training alone")
    job.stop_file.touch()
    assert a.wait(60) == 0, a.output()
