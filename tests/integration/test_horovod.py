"""Horovod workers under the launcher (`--backend horovod`): real Horovod, gloo, CPU, agents as
separate processes on 127.0.0.1 sharing one real etcd.

Needs Horovod built with PyTorch and gloo (`bash integrations/horovod/install.sh`; CI runs it).
"""
import json
import re
from collections import defaultdict

import pytest
import torch

from tests.support import parameter_differences, require_horovod

from .agents import REPO, Agent, new_mark, processes_with_mark, read_events, wait_for
from .test_horovod_cli import discover

pytestmark = [pytest.mark.integration, pytest.mark.horovod]

require_horovod(allow_module_level=True)  # fails instead under CI

SCRIPTS = REPO / "tests" / "integration" / "scripts"
RDZV_CONF = "last_call_timeout=0.5,join_settle=0.3,lease_ttl=60"


@pytest.fixture
def agents(tmp_path, etcd_endpoint, run_id):
    """start(name, *args, nnodes=..., nproc=..., rdzv_id=...) -> a `--backend horovod` Agent."""
    mark, started = new_mark(), []

    def start(name, script, *script_args, nnodes="1:2", nproc=1, extra=(), rdzv_id=run_id,
              env=None):
        args = ["--backend", "horovod", "--nnodes", nnodes, "--nproc-per-node", nproc,
                "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", rdzv_id, "--rdzv-conf", RDZV_CONF,
                "--log-dir", tmp_path / f"logs-{rdzv_id}", *extra, script, *script_args]
        agent = Agent(args, tmp_path, name, mark, env=env)
        started.append(agent)
        return agent

    start.tmp, start.mark, start.endpoint, start.run_id = tmp_path, mark, etcd_endpoint, run_id
    yield start
    for agent in started:
        agent.stop()
    assert processes_with_mark(mark) == [], "processes outlived the test's agents"


def seen(agent, pattern, since=0, timeout=90):
    """Wait for a line matching `pattern` after output position `since`; return the match."""
    def find():
        return re.search(pattern, agent.output()[since:])
    return wait_for(find, timeout=timeout, what=f"{pattern!r} from {agent.name}")


def test_a_horovodrun_script_runs_unmodified_on_two_agents(agents):
    # Every node of a job runs the same --nproc-per-node (the job spec says so; slots of
    # unequal nodes are covered by tests/unit/test_horovod_slots.py).
    a = agents("a", SCRIPTS / "hvd_static.py", nnodes="2", nproc=2)
    b = agents("b", SCRIPTS / "hvd_static.py", nnodes="2", nproc=2)
    assert a.wait(120) == 0, a.output()[-3000:]
    assert b.wait(60) == 0, b.output()[-3000:]
    out = a.output() + b.output()
    # Two agents are two Horovod hosts (ranks in the order they joined); the cross communicator
    # of each local rank holds that local rank of both nodes.
    slots = [tuple(map(int, m)) for m in re.findall(
        r"HVD rank=(\d) size=4 local_rank=(\d) local_size=(\d) cross_rank=(\d) cross_size=(\d)",
        out)]
    assert sorted(s[0] for s in slots) == [0, 1, 2, 3], out[-3000:]
    assert sorted(s[1:3] + s[4:] for s in slots) == [(0, 2, 2), (0, 2, 2), (1, 2, 2),
                                                     (1, 2, 2)], slots
    for local_rank in (0, 1):
        assert sorted(s[3] for s in slots if s[1] == local_rank) == [0, 1], slots
    checksums = set(re.findall(r"DONE rank=\d size=4 checksum=(\S+)", out))
    assert len(re.findall(r"DONE rank=", out)) == 4 and len(checksums) == 1, out[-3000:]


def test_elastic_script_grows_and_shrinks_in_place_and_resumes_from_its_commit(agents):
    stop = agents.tmp / "stop"
    script = (SCRIPTS / "hvd_elastic.py", "--stop-file", stop, "--commit-every", "4")
    a = agents("a", *script)
    seen(a, r"STEP \S+ step=\d+ size=1 rank=0")
    b = agents("b", *script)
    pos = seen(a, r"STEP \S+ step=\d+ size=2 rank=0").end()
    found = discover(agents.endpoint, agents.run_id)
    assert found.returncode == 0 and found.stdout == "127.0.0.1:2\n", found

    seen(a, r"STEP \S+ step=\d+ size=2 rank=0", since=pos)  # stepping when b dies
    b.kill_node()
    entered = seen(a, r"ENTER \S+ step=(\d+) size=1 rank=0", since=pos)
    before_kill = [int(s) for s in re.findall(r"STEP \S+ step=(\d+) size=2",
                                              a.output()[pos:pos + entered.start()])]
    resumed = int(entered.group(1))
    # The survivor rolled back to its last commit, no further: the last multiple of 4 it passed.
    assert resumed % 4 == 0 and 0 <= max(before_kill) - resumed < 4, (resumed, before_kill)
    seen(a, rf"STEP \S+ step={resumed + 1} size=1 rank=0", since=pos)
    stop.touch()
    assert a.wait(60) == 0, a.output()[-3000:]

    out = a.output()
    pids = set(re.findall(r"(?:ENTER|STEP) .* pid=(\d+)", out))
    assert len(pids) == 1, f"rank 0 was restarted: {pids}"  # grew and shrank in its process
    events = read_events(agents.tmp / f"logs-{agents.run_id}")
    rescales = [e for e in events if e["event"] == "rescale" and e["node"] == events[0]["node"]]
    assert [(e["world_size"], e["in_place"]) for e in rescales] == [(2, True), (1, True)]
    # Both nodes imported torch and Horovod in standby before they registered.
    assert [e["cause"] for e in events if e["event"] == "joined"] == ["prewarmed"] * 2
    assert events[-1]["event"] == "job_finished" and events[-1]["exit_code"] == 0


def surviving_steps(records_dir):
    """Per step, the records of the last attempt that trained it (earlier ones were rolled back)."""
    by_step = defaultdict(list)
    for path in records_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]].append(rec)
    return {step: [r for r in recs if r["attempt"] == max(x["attempt"] for x in recs)]
            for step, recs in by_step.items()}


def fixed_job(agents, name, dataset=200, epochs=3):
    tmp = agents.tmp / name
    (tmp / "records").mkdir(parents=True)
    allowance = tmp / "allowance"

    def allow(steps):
        allowance.with_suffix(".tmp").write_text(str(steps))
        allowance.with_suffix(".tmp").replace(allowance)

    def start(agent_name, nnodes="1:2"):
        return agents(agent_name, SCRIPTS / "hvd_fixed_train.py", "--out", tmp / "params.pt",
                      "--record-dir", tmp / "records", "--allowance-file", allowance,
                      "--epochs", epochs, "--dataset", dataset, nnodes=nnodes,
                      rdzv_id=f"{agents.run_id}-{name}",
                      extra=["--global-batch-size", 10, "--max-micro-batch", 4])

    allow(0)
    return start, allow, tmp


def test_fixed_policy_trains_like_one_process_across_1_2_1_workers(agents):
    start, allow, ref = fixed_job(agents, "reference")
    allow(10**6)
    assert start("ref", nnodes="1").wait(120) == 0
    expected = torch.load(ref / "params.pt")

    start, allow, tmp = fixed_job(agents, "elastic")
    a = start("a")
    seen(a, r"RESUMED step=0 epoch=0 cursor=0 world=1 rank=0")
    allow(6)
    pos = seen(a, r"step=6 world=1 rank=0").end()
    b = start("b")
    pos += seen(a, r"RESUMED step=6 epoch=0 cursor=60 world=2 rank=0", since=pos).end()
    allow(15)
    pos += seen(a, r"step=15 world=2 rank=0", since=pos).end()
    allow(10**6)
    pos += seen(a, r"step=17 world=2 rank=0", since=pos).end()
    b.kill_node()  # while stepping: a rolls back to its last commit and goes on alone
    seen(a, r"RESUMED step=\d+ epoch=\d cursor=\d+ world=1 rank=0", since=pos)
    assert a.wait(120) == 0, a.output()[-3000:]

    out = a.output()
    assert "PLAN world 1 -> 2 accum=2" in out and "PLAN world 2 -> 1 accum=3" in out, out[-3000:]
    assert len(set(re.findall(r"RESUMED .* pid=(\d+)", out))) == 1, "rank 0 was restarted"
    problems = parameter_differences(torch.load(tmp / "params.pt"), expected)
    assert not problems, "\n".join(problems)
    final = surviving_steps(tmp / "records")
    assert sorted(final) == list(range(1, 3 * 200 // 10 + 1))
    for epoch in range(3):
        used = sorted(i for recs in final.values() for r in recs if r["epoch"] == epoch
                      for i in r["indices"])
        assert used == list(range(200)), f"epoch {epoch} is not a permutation"
    assert {len(recs) for recs in final.values()} == {1, 2}


def test_a_horovod_script_under_the_torch_backend_is_named(tmp_path, etcd_endpoint, run_id):
    mark = new_mark()
    a = Agent(["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-endpoint", etcd_endpoint,
               "--rdzv-id", run_id, SCRIPTS / "hvd_static.py"], tmp_path, "a", mark)
    try:
        code = a.wait(60)
    finally:
        a.stop()
    assert code != 0
    assert "error: job failed: " in a.output() and "run it with --backend horovod" in a.output()
    assert processes_with_mark(mark) == []
