"""`python -m elastic.run` as a user meets it: the example, and every kind of bad input.

Each bad input must give one clear line, a non-zero exit, no orphan process and no leftover
embedded etcd data dir (the agents here get their own TMPDIR to check that).
"""
import re
import signal
import socket

import psutil
import pytest

from .agents import REPO, Agent, new_mark, processes_with_mark, read_events, wait_for

pytestmark = pytest.mark.integration


def run_agent(tmp_path, args, timeout=90):
    mark = new_mark()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    agent = Agent(args, tmp_path, "agent", mark, env={"TMPDIR": str(tmpdir)})
    try:
        code = agent.wait(timeout)
    finally:
        agent.stop()
    assert processes_with_mark(mark) == [], "the launcher left processes behind"
    assert etcd_dirs(tmpdir) == [], "the embedded etcd's data dir was left behind"
    return code, agent.output()


def etcd_dirs(tmpdir):
    return [p for p in tmpdir.iterdir() if p.name.startswith("elastic-etcd-")]


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_example_trains_with_two_workers_on_the_embedded_etcd(tmp_path):
    code, out = run_agent(tmp_path, ["--nproc-per-node", "2", "--log-dir", tmp_path / "logs",
                                     REPO / "examples" / "train.py", "--epochs", "1"])
    assert code == 0, out[-3000:]
    assert "DONE world=2" in out
    assert (tmp_path / "logs" / "round1" / "rank1.log").read_text()
    assert [e["event"] for e in read_events(tmp_path / "logs")] == ["joined", "rendezvous", "job_finished"]


@pytest.mark.parametrize("args, words", [
    (["no_such_script.py"], "training script 'no_such_script.py' not found"),
    (["--nnodes", "3:1", "x.py"], "--nnodes 3:1: MIN is larger than MAX"),
    (["--nproc-per-node", "0", "x.py"], "--nproc-per-node must be at least 1"),
    (["--rdzv-conf", "join_timeout=soon", "x.py"], "is not a number"),
    (["--no-python", "no-such-binary-xyz"], "not found on PATH"),
    (["-m", "no_such_module"], "module 'no_such_module' (-m) not found"),
    (["examples"], "training script 'examples' is a directory"),
    (["--bogus-flag", "x.py"], "unrecognized arguments: --bogus-flag; run `python -m elastic.run --help`"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, words):
    code, out = run_agent(tmp_path, args)
    assert code == 2
    assert len(error_lines(out)) == 1 and words in error_lines(out)[0], out


def test_unreachable_endpoint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out = run_agent(tmp_path, ["--rdzv-endpoint", f"127.0.0.1:{port}",
                                     "--rdzv-conf", "connect_timeout=2",
                                     REPO / "examples" / "train.py"])
    assert code == 1
    [line] = error_lines(out)
    assert f"etcd at 127.0.0.1:{port} is unreachable" in line and "python -m rendezvous" in line


def test_master_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = run_agent(tmp_path, ["--master-port", port, REPO / "examples" / "train.py"])
    assert code == 2
    [line] = error_lines(out)
    assert f"--master-port {port} is already in use" in line


def test_worker_that_fails_at_once_reports_rank_code_and_traceback(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n"
                      "    raise RuntimeError('bad batch shape')\nimport time\ntime.sleep(30)\n")
    code, out = run_agent(tmp_path, ["--nproc-per-node", "2", script])
    assert code == 1
    [line] = error_lines(out)
    assert "job failed: rank 1 (local rank 1" in line and "exited with code 1" in line
    assert "RuntimeError: bad batch shape" in out  # the traceback is shown
    assert "Traceback (most recent call last):" in out


def test_ctrl_c_stops_workers_and_removes_the_embedded_etcd(tmp_path):
    mark = new_mark()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    stop = tmp_path / "never"
    agent = Agent(["--nproc-per-node", "2", "--log-dir", tmp_path / "logs",
                   REPO / "tests" / "integration" / "scripts" / "steps.py", "--stop-file", stop],
                  tmp_path, "agent", mark, env={"TMPDIR": str(tmpdir)})
    try:
        wait_for(lambda: "world=2 rank=0" in agent.output(), timeout=60, what="training")
        agent.signal(signal.SIGINT)
        assert agent.wait(30) == 128 + signal.SIGINT
    finally:
        agent.stop()
    assert processes_with_mark(mark) == []
    assert etcd_dirs(tmpdir) == []
    assert read_events(tmp_path / "logs")[-1]["cause"] == "sigint"


def test_a_script_raising_after_init_names_the_exception_in_the_summary(tmp_path):
    script = tmp_path / "boom_after_init.py"
    script.write_text(
        "import os, time\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "if os.environ['RANK'] == '0':\n    raise ValueError('boom')\n"
        "dist.barrier()  # rank 1 fails in the collective once rank 0 is gone\n")
    code, out = run_agent(tmp_path, ["--nproc-per-node", "2", script])
    assert code == 1
    [line] = error_lines(out)
    assert "job failed: rank 0 (local rank 0" in line and line.endswith(
        "max_restarts=0 exhausted") and ": ValueError: boom on node" in line, line
    below = out[out.index(line):]
    assert "Traceback (most recent call last):" in below and "ValueError: boom" in below
    assert "[rank0]: [rank0]:" not in out and "[rank1]: [rank1]:" not in out


def test_waiting_for_nodes_is_said_every_few_seconds_and_the_end_says_how_long(tmp_path,
                                                                               etcd_endpoint,
                                                                               run_id):
    mark = new_mark()
    stop = tmp_path / "stop"
    common = ["--nnodes", "2", "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", run_id,
              "--rdzv-conf", "last_call_timeout=0.3", REPO / "tests" / "integration" / "scripts" /
              "steps.py", "--stop-file", stop]
    first = Agent(common, tmp_path, "first", mark)
    second = None
    try:
        expected = (f"waiting for nodes: 1 of the 2 needed are here (job '{run_id}' at etcd "
                    f"{etcd_endpoint}); start the others with --rdzv-endpoint {etcd_endpoint} "
                    f"--rdzv-id {run_id}")
        wait_for(lambda: first.output().count(expected) >= 2, timeout=30,
                 what="the waiting message, twice")
        second = Agent(common, tmp_path, "second", mark)
        wait_for(lambda: "world=2 rank=0" in first.output() + second.output(), timeout=60,
                 what="training in a world of 2")
        stop.touch()
        assert first.wait(60) == 0 and second.wait(60) == 0
    finally:
        for agent in (first, second):
            if agent is not None:
                agent.stop()
    assert re.search(rf"job {run_id} finished after \d+\.\d s", first.output())
    assert processes_with_mark(mark) == []


def test_an_agent_killed_alone_by_sigkill_takes_its_workers_and_etcd_and_the_next_start_cleans_up(
        tmp_path):
    mark = new_mark()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    stop = tmp_path / "never"
    agent = Agent(["--nproc-per-node", "2", REPO / "tests" / "integration" / "scripts" /
                   "steps.py", "--stop-file", stop], tmp_path, "agent", mark,
                  env={"TMPDIR": str(tmpdir)})
    try:
        wait_for(lambda: "world=2 rank=1" in agent.output(), timeout=60, what="training")
        agent.proc.send_signal(signal.SIGKILL)  # the agent alone, not its process tree
        agent.proc.wait(10)
        wait_for(lambda: processes_with_mark(mark) == [], timeout=10,
                 what="workers and etcd to die with their agent")
    finally:
        agent.stop()
    left = etcd_dirs(tmpdir)
    assert len(left) == 1, "a SIGKILLed agent cannot remove its etcd's data dir itself"

    code, out = run_agent(tmp_path, ["--nproc-per-node", "1", REPO / "examples" / "train.py",
                                     "--epochs", "1"])
    assert code == 0, out[-2000:]
    assert not left[0].exists()  # removed at the start, as its owner is gone
    # The workers' scratch dirs too (torch keeps a cache of its own there: not ours).
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("elastic-")] == []


def test_workers_of_a_one_machine_job_listen_on_loopback_only(tmp_path):
    mark = new_mark()
    stop = tmp_path / "stop"
    # Workers as new processes: /proc shows a zygote-forked worker's command line and
    # environment as the zygote's (they were set at exec).
    agent = Agent(["--nproc-per-node", "2", "--preload", "none",
                   REPO / "tests" / "integration" / "scripts" / "steps.py", "--stop-file", stop,
                   "--step-sleep", "0.2"], tmp_path, "agent", mark)
    try:
        wait_for(lambda: "world=2 rank=1" in agent.output(), timeout=60, what="training")
        workers = [p for p in psutil.Process(agent.proc.pid).children()
                   if any("steps.py" in part for part in p.cmdline())]  # not the etcd
        assert len(workers) == 2
        for worker in workers:
            assert worker.environ()["GLOO_SOCKET_IFNAME"] == "lo"
            store_port = int(worker.environ()["MASTER_PORT"])
            listening = [c.laddr for c in worker.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port != store_port]
            assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        stop.touch()
        assert agent.wait(60) == 0
    finally:
        agent.stop()


def test_grace_period_gives_a_worker_that_ignores_sigterm_that_long_then_kills_it(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import signal, sys, time\n"
        "def ignore(*_):\n"
        "    print(f'SIGTERM {time.time():.3f}', flush=True)\n"
        "signal.signal(signal.SIGTERM, ignore)\n"
        "print('READY', flush=True)\n"
        "while True:\n"
        "    print(f'ALIVE {time.time():.3f}', flush=True)\n"
        "    time.sleep(0.05)\n")
    mark = new_mark()
    agent = Agent(["--grace-period", "2", script], tmp_path, "agent", mark)
    try:
        wait_for(lambda: "READY" in agent.output(), timeout=60, what="the worker")
        agent.signal(signal.SIGTERM)
        assert agent.wait(60) == 128 + signal.SIGTERM
    finally:
        agent.stop()
    out = agent.output()
    got = float(re.search(r"SIGTERM (\S+)", out).group(1))
    last_alive = max(float(t) for t in re.findall(r"ALIVE (\S+)", out))
    assert last_alive - got >= 1.5  # it was given the grace period, then killed
    assert processes_with_mark(mark) == []


def test_local_addr_is_where_this_node_is_reached(tmp_path, etcd_endpoint, run_id):
    mark, stop = new_mark(), tmp_path / "stop"
    agent = Agent(["--rdzv-endpoint", etcd_endpoint, "--rdzv-id", run_id, "--local-addr",
                   "127.0.0.2", "--nproc-per-node", "2", REPO / "tests" / "integration" /
                   "scripts" / "steps.py", "--stop-file", stop], tmp_path, "agent", mark)
    try:
        wait_for(lambda: "world=2 rank=1" in agent.output(), timeout=60, what="training")
        listening = {c.laddr.ip for c in psutil.Process(agent.proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        stop.touch()
        assert agent.wait(60) == 0
    finally:
        agent.stop()
    # The rank-0 store's address given to every worker, and the agent's health endpoint.
    assert set(re.findall(r"START rank=\d world=2 master=(\S+)", agent.output())) == {"127.0.0.2"}
    assert "127.0.0.2" in listening


def test_a_module_runs_with_dash_m(tmp_path):
    mark, stop = new_mark(), tmp_path / "stop"
    stop.touch()  # the workers stop at their first step
    agent = Agent(["--nproc-per-node", "2", "-m", "tests.integration.scripts.steps",
                   "--stop-file", stop], tmp_path, "agent", mark)
    try:
        assert agent.wait(60) == 0, agent.output()[-2000:]
    finally:
        agent.stop()
    assert sorted(re.findall(r"DONE world=2 rank=(\d)", agent.output())) == ["0", "1"]
