"""The agent's side of Horovod workers (integrations.horovod.agent) speaking Horovod's rendezvous
protocol over HTTP, backed by a real etcd; requests are made the way Horovod's HTTPStore makes
them, without Horovod or worker processes. Also the runner Horovod workers start through."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from elastic.contract import CollectiveFailed
from elastic.policy import make_policy
from integrations.horovod.agent import HorovodBackend
from integrations.horovod.slots import ENV_PLAN_URL, REMOVED
from integrations.horovod.worker import current_plan
from launcher.workers import WorkerSpec, WorldAssignment
from rendezvous.store import EtcdStore

pytestmark = pytest.mark.integration


def assignment(number, member_nprocs, group_rank, env=None):
    return WorldAssignment(
        run_id="r", round=number, group_rank=group_rank, group_world_size=len(member_nprocs),
        rank_offset=sum(member_nprocs[:group_rank]), world_size=sum(member_nprocs),
        master_addr="127.0.0.1", master_port=1, restart_count=0, max_restarts=0,
        env=env or {}, member_nprocs=tuple(member_nprocs))


@pytest.fixture
def node(etcd_endpoint, run_id):
    store = EtcdStore(etcd_endpoint, run_id)
    woken = threading.Event()
    spec = WorkerSpec(argv=(sys.executable, "-u", "train.py"), nproc=2)
    workers = HorovodBackend(store, spec, node_id="node-a", host="127.0.0.1", wake=woken.set)
    workers.store, workers.woken = store, woken
    yield workers
    workers.close()
    store.delete_job()
    store.close()


def http(workers, local_rank, method, path, body=None):
    port = workers._endpoints[local_rank].port
    request = urllib.request.Request(f"http://127.0.0.1:{port}/{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(condition, what, timeout=30.0):
    """condition()'s first true value, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def spawn(workers, a):
    return [workers.spawn_env(a, k) for k in range(workers.nproc)]


def test_keys_go_to_etcd_under_the_round_of_the_worker_that_wrote_them(node):
    env = spawn(node, assignment(1, [2], 0))
    assert env[1]["HOROVOD_GLOO_RENDEZVOUS_PORT"] != env[0]["HOROVOD_GLOO_RENDEZVOUS_PORT"]
    assert env[1]["HOROVOD_RANK"] == "1" and env[1]["HOROVOD_HOSTNAME"] == "node-a"
    assert http(node, 0, "PUT", "global/0", b"addr-0") == (200, b"")
    assert node.keys.get(1, "global", "0") == b"addr-0"
    assert http(node, 1, "GET", "global/0") == (200, b"addr-0")

    assert http(node, 1, "GET", "global/1")[0] == 404  # held a while, then not there

    # A GET of a missing key waits for it: one written while the request is held is returned
    # (how long that takes is the benchmarks' business, not this test's).
    answer = {}
    asking = threading.Thread(target=lambda: answer.update(got=http(node, 0, "GET", "global/1")))
    asking.start()
    node.keys.put(1, "global", "1", b"addr-1")
    asking.join(30)
    assert answer["got"] == (200, b"addr-1")


def test_rank_and_size_waits_for_a_newer_round_and_reports_a_failed_collective(node):
    spawn(node, assignment(1, [2], 0))
    answers = {}
    asking = threading.Thread(target=lambda: answers.update(
        a=http(node, 1, "GET", "rank_and_size/node-a:1")))
    asking.start()
    heard = wait_until(lambda: node.drain(), "the agent to hear why the worker asked")
    assert [m for _, m in heard] == [CollectiveFailed(
        round=1, error="Horovod worker node-a:1 (local rank 1) reset after a failed collective "
                       "in round 1")]
    assert asking.is_alive()  # no newer round: it waits for one
    node.push_round(assignment(2, [1, 2], 1))  # now the second of two nodes
    asking.join(5)
    assert answers["a"] == (200, b"2,3,1,2,0,1")
    # Its keys now go to round 2; the other worker still uses round 1.
    http(node, 1, "PUT", "global/2", b"x")
    assert node.keys.get(2, "global", "2") == b"x"
    assert node.keys.get(1, "global", "2") is None


def test_workers_of_a_node_left_out_are_told_they_were_removed(node):
    spawn(node, assignment(1, [2], 0))
    node.push_standby(2)
    assert http(node, 0, "GET", "rank_and_size/node-a:0") == (200, REMOVED.encode())
    spawn(node, assignment(3, [2], 0))
    node.push_leave(checkpoint=False)
    assert http(node, 1, "GET", "rank_and_size/node-a:1") == (200, REMOVED.encode())


def test_a_finished_rendezvous_leaves_no_keys_behind(node):
    spawn(node, assignment(1, [2], 0))
    node.keys.put(1, "global", "0", b"stale")
    node.push_round(assignment(2, [2], 0))
    for k in range(2):
        threading.Thread(target=http, args=(node, k, "GET", f"rank_and_size/node-a:{k}")).start()
    for k in range(2):
        http(node, k, "PUT", f"global/rank_{k}", b"host")
        http(node, k, "PUT", f"global/{k}", b"addr")
    assert node.common_round() != 2
    for k in range(2):
        assert http(node, k, "DELETE", f"global/{k}") == (200, b"")
    assert node.common_round() == 2
    assert node.keys.get(2, "global", "rank_0") is None
    assert node.keys.get(1, "global", "0") is None  # the older round is gone too


def test_the_plan_of_the_round_a_worker_is_in(node):
    policy = make_policy("fixed", global_batch=10, max_micro_batch=4, reference_world=1)
    env = spawn(node, assignment(1, [2], 0, env=policy.plan(2).to_env()))
    assert current_plan(env[0]) == policy.plan(2)
    node.push_round(assignment(2, [2, 2], 0, env=policy.plan(4).to_env()))
    assert current_plan(env[0]) == policy.plan(2)  # not re-initialised yet
    http(node, 0, "GET", "rank_and_size/node-a:0")
    assert current_plan(env[0]) == policy.plan(4)
    assert json.loads(http(node, 0, "GET", "elastic_plan/node-a:0")[1])["ELASTIC_ACCUM_STEPS"] == "1"


def test_the_plan_without_a_policy_names_the_flags(node):
    env = spawn(node, assignment(1, [2], 0))
    with pytest.raises(ValueError, match="--global-batch-size"):
        current_plan(env[0])
    assert ENV_PLAN_URL in env[0]


def test_starting_workers_follow_rounds_in_place_only_in_an_elastic_job(node):
    spawn(node, assignment(1, [2], 0))
    assert not node.can_follow(2)  # nobody entered hvd.elastic.run: a static script
    node.keys.mark_elastic()
    assert node.can_follow(2)
    assert not node.can_follow(1)
    node.stop()
    assert not node.can_follow(2)


def test_workers_in_standby_get_their_first_world_from_the_round(node):
    assert node.can_prewarm
    assert node.spec.argv == (sys.executable, "-u", "-m", "integrations.horovod.prewarm",
                              "train.py")
    got = {}
    waiting = [threading.Thread(target=lambda k=k: got.update({k: http(node, k, "GET",
                                                                        f"elastic_start/{k}")}))
               for k in range(2)]
    for t in waiting:
        t.start()
    wait_until(node.all_in_standby, "both workers waiting in standby")
    assert node.can_follow(2)  # standby workers take a round in place
    node.push_round(assignment(4, [1, 2], 1))
    for t in waiting:
        t.join(5)
    world = {k: json.loads(body) for k, (code, body) in got.items()}
    assert world[1]["RANK"] == world[1]["HOROVOD_RANK"] == "2"
    assert world[1]["HOROVOD_CROSS_SIZE"] == "1" and world[0]["WORLD_SIZE"] == "3"
    assert world[0]["HOROVOD_GLOO_RENDEZVOUS_PORT"] == str(node._endpoints[0].port)
    assert not node.all_in_standby()
    http(node, 0, "PUT", "global/1", b"x")  # its keys go to the round it was given
    assert node.keys.get(4, "global", "1") == b"x"


def test_a_worker_in_standby_that_is_not_needed_is_told_so(node):
    done = {}
    node.woken.clear()
    asking = threading.Thread(target=lambda: done.update(a=http(node, 0, "GET", "elastic_start/0")))
    asking.start()
    assert node.woken.wait(30)  # the worker is waiting for its world
    node.stop()  # its node stopped the workers
    asking.join(5)
    assert done["a"][0] == 404


def test_the_agent_watch_ignores_rendezvous_keys(node):
    calls = []
    node.store.watch(lambda: calls.append(1))
    node.keys.put(1, "global", "0", b"x")
    node.store.mark_in_place()
    # etcd delivers watch events in revision order: once the later key's call has come, the
    # rendezvous key's would have come before it.
    wait_until(lambda: calls, "the watch to see the job key")
    assert calls == [1]


def test_the_runner_runs_a_script_as_python_would(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    script = tmp_path / "show.py"
    script.write_text(
        "import json, sys\n"
        "print(json.dumps({'name': __name__, 'argv': sys.argv, 'path0': sys.path[0],\n"
        "                  'main': sys.modules['__main__'].__file__}))\n"
        "sys.exit(int(sys.argv[1]))\n")
    env = dict(os.environ, PYTHONPATH=str(repo))
    runs = [subprocess.run([sys.executable, "-u", *prefix, str(script), "3", "x"], cwd=repo,
                           env=env, capture_output=True, text=True, timeout=60)
            for prefix in ([], ["-m", "integrations.horovod.prewarm"])]
    assert [r.returncode for r in runs] == [3, 3], runs
    direct, runner = (json.loads(r.stdout) for r in runs)
    assert runner == direct == {"name": "__main__", "argv": [str(script), "3", "x"],
                                "path0": str(tmp_path), "main": str(script)}
