"""Every batch policy through running agents: the plan a worker is started with in a world of 1,
then of 2 nodes, is the policy's plan for that world, and the warm-up length reaches it."""
import math
import re

import pytest

from elastic.policy import make_policy

from .agents import REPO, Agent, new_mark, processes_with_mark, wait_for

pytestmark = pytest.mark.integration

SCRIPT = REPO / "tests" / "integration" / "scripts" / "plan_report.py"
PLAN = re.compile(r"PLAN rank=0 world=(\d+) policy=(\S+) global=(\d+) accum=(\d+) "
                  r"factor=(\S+) scale=(\S+) warmup=(\d+)")


def plans(text):
    return {int(m[0]): (m[1], int(m[2]), int(m[3]), float(m[4]), float(m[5]), int(m[6]))
            for m in PLAN.findall(text)}


@pytest.mark.parametrize("flags, policy_args, by_world", [
    # linear: the per-worker batch stays, the global batch and the rate grow with the world
    (["--per-worker-batch-size", "4"],
     dict(name="linear", per_worker_batch=4, reference_world=1),
     {1: ("linear", 4, 1.0, 1.0), 2: ("linear", 8, 2.0, 2.0)}),
    # sqrt against a reference world of 2: the rate is sqrt(world / 2)
    (["--batch-policy", "sqrt", "--per-worker-batch-size", "4", "--reference-world-size", "2"],
     dict(name="sqrt", per_worker_batch=4, reference_world=2),
     {1: ("sqrt", 4, math.sqrt(0.5), 0.5), 2: ("sqrt", 8, 1.0, 1.0)}),
    # adascale: the batch scales, the rate factor stays 1 (the script applies the gain)
    (["--batch-policy", "adascale", "--per-worker-batch-size", "4", "--lr-warmup-steps", "5"],
     dict(name="adascale", per_worker_batch=4, reference_world=1, warmup_steps=5),
     {1: ("adascale", 4, 1.0, 1.0), 2: ("adascale", 8, 1.0, 2.0)}),
])
def test_the_plan_of_each_world_reaches_the_workers(tmp_path, etcd_endpoint, run_id, flags,
                                                    policy_args, by_world):
    mark, stop = new_mark(), tmp_path / "stop"
    args = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
            *flags, SCRIPT, "--stop-file", stop]
    agents = [Agent(args, tmp_path, "a", mark)]
    try:
        wait_for(lambda: 1 in plans(agents[0].output()), timeout=60, what="world 1's plan")
        agents.append(Agent(args, tmp_path, "b", mark))
        wait_for(lambda: 2 in plans(agents[0].output()), timeout=90, what="world 2's plan")
        stop.touch()
        assert [agent.wait(60) for agent in agents] == [0, 0]
    finally:
        for agent in agents:
            agent.stop()
    seen = plans(agents[0].output())
    name = policy_args.pop("name")
    policy = make_policy(name, **policy_args)
    warmup = policy_args.get("warmup_steps", 0)
    for world, (policy_name, global_batch, factor, scale) in by_world.items():
        plan = policy.plan(world)
        assert (plan.global_batch, plan.lr_factor, plan.scale) == pytest.approx(
            (global_batch, factor, scale))
        assert seen[world] == (policy_name, global_batch, plan.accum_steps, plan.lr_factor,
                               plan.scale, warmup)
    assert processes_with_mark(mark) == []
