"""The zygote (launcher/zygote.py): a forked worker behaves as a new process would, restarts are
forked from it, and it and its workers die with a SIGKILLed agent."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from launcher.zygote import Zygote, parse_command

from .agents import STEPS, Agent, new_mark, processes_with_mark, read_events, wait_for

pytestmark = pytest.mark.integration

PROBE = Path(__file__).resolve().parent / "scripts" / "zygote_probe.py"


@pytest.fixture(scope="module")
def zygote():
    z = Zygote(preload=("json",))  # the mechanism is the same with torch, only slower to start
    z.start()
    yield z
    z.close()


def run_both(zygote, args, cwd, between=lambda: None):
    """The probe as a new process and as a forked worker: (returncode, stdout, stderr) each."""
    argv = [sys.executable, "-u", str(PROBE), *args]
    env = {**os.environ, "ZYGOTE_PROBE": "yes"}
    plain = subprocess.run(argv, env=env, cwd=cwd, capture_output=True,
                           stdin=subprocess.DEVNULL, start_new_session=True, timeout=60)
    between()
    assert zygote.can_run(argv, env)
    worker = zygote.spawn(argv, env, str(cwd))
    out, err = worker.stdout.read(), worker.stderr.read()
    forked = (worker.wait(30), out, err)
    return (plain.returncode, plain.stdout, plain.stderr), forked


def test_a_forked_worker_sees_what_a_new_process_sees(zygote, tmp_path):
    marker = tmp_path / "r a n"
    plain, forked = run_both(zygote, ["--code", "3", "--atexit-file", marker.name], tmp_path,
                             between=marker.unlink)
    assert forked == plain
    code, out, err = forked
    assert code == 3 and b"NAME __main__" in out
    assert b"ARGV ['--code', '3', '--atexit-file', 'r a n']" in out
    assert f"PATH0 {PROBE.parent}".encode() in out and f"CWD {tmp_path}".encode() in out
    assert b"ENV yes" in out and b"STDIN ''" in out and b"SESSION True" in out
    assert b"THREAD done" in out and err == b"TO STDERR\n"
    assert marker.read_text() == "ran"  # the forked worker's atexit handler ran


def test_an_uncaught_exception_exits_1_with_its_traceback_as_in_a_new_process(zygote, tmp_path):
    plain, forked = run_both(zygote, ["--raise"], tmp_path)
    assert forked[0] == plain[0] == 1
    assert forked[2].splitlines()[-1] == plain[2].splitlines()[-1] == b"ValueError: boom"


def test_only_commands_a_fork_reproduces_are_forked(tmp_path):
    py = sys.executable
    assert parse_command([py, "-u", str(PROBE), "a"]) == ("script", str(PROBE), ("a",))
    assert parse_command([py, "-u", "-m", "pkg.mod", "a"]) == ("module", "pkg.mod", ("a",))
    assert parse_command(["/bin/echo", "x"]) is None  # --no-python
    assert parse_command([py, "-X", "dev", str(PROBE)]) is None  # other interpreter options
    assert parse_command([py, str(tmp_path)]) is None  # a directory (its __main__.py)


@pytest.fixture
def agent_factory(tmp_path):
    mark, started = new_mark(), []

    def start(args, script_args=()):
        agent = Agent([*args, "--log-dir", tmp_path / "logs", STEPS, "--stop-file",
                       tmp_path / "stop", *script_args], tmp_path, f"agent{len(started)}", mark)
        started.append(agent)
        return agent
    start.mark, start.stop_file = mark, tmp_path / "stop"
    yield start
    for agent in started:
        agent.stop()
    assert processes_with_mark(mark) == [], "processes outlived the test"


def _zygote_of(agent):
    return [p for p in psutil.Process(agent.proc.pid).children()
            if "launcher.zygote" in p.cmdline()]


def test_restarted_workers_are_forked_by_the_zygote(agent_factory):
    agent = agent_factory(["--nproc-per-node", "2", "--rescale-mode", "restart",
                           "--max-restarts", "1"], ["--fail-first-attempt"])
    wait_for(lambda: "published round 2" in agent.output() and "world=2 rank=1" in agent.output(),
             timeout=120, what="the workers restarted after the first attempt failed")
    (zygote,) = _zygote_of(agent)
    out = agent.output()
    pids = {int(line.split("pid=")[1]) for line in out.splitlines()
            if "START" in line and "pid=" in line}
    children = {p.pid for p in zygote.children()}
    assert len(pids) == 4 and children <= pids and len(children) == 2
    agent_factory.stop_file.touch()
    assert agent.wait(60) == 0


def test_a_sigkilled_agent_takes_its_zygote_and_forked_workers_with_it(agent_factory):
    agent = agent_factory(["--nproc-per-node", "2", "--rescale-mode", "restart"])
    wait_for(lambda: "world=2 rank=1" in agent.output(), timeout=120, what="training")
    (zygote,) = _zygote_of(agent)
    workers = zygote.children()
    assert len(workers) == 2
    os.kill(agent.proc.pid, signal.SIGKILL)  # the agent alone: the rest must follow by itself
    agent.proc.wait()
    gone, alive = psutil.wait_procs([zygote, *workers], timeout=10)
    assert alive == []


def test_a_zygote_that_cannot_import_is_skipped_with_a_warning(agent_factory):
    agent = agent_factory(["--nproc-per-node", "1", "--preload", "no_such_module_here"])
    wait_for(lambda: "world=1 rank=0" in agent.output(), timeout=120, what="training")
    assert "no zygote (import of no_such_module_here failed" in agent.output()
    agent_factory.stop_file.touch()
    assert agent.wait(60) == 0


def test_a_forked_worker_exits_as_a_new_process_does(zygote, tmp_path):
    """Executors and unclosed files at exit, pickling of its own classes from atexit, SIGPIPE,
    OMP_NUM_THREADS: what a fork could get wrong and a new process does not."""
    script = tmp_path / "exits.py"
    script.write_text(
        "import atexit, concurrent.futures, pickle, signal\n"
        "class Point:\n"
        "    pass\n"
        "pool = concurrent.futures.ThreadPoolExecutor(2)\n"
        "print('SUM', pool.submit(sum, [1, 2]).result())\n"
        "unclosed = open('unclosed.txt', 'w')\n"
        "unclosed.write('kept')\n"
        "atexit.register(lambda: print('PICKLED', len(pickle.dumps(Point())) > 0))\n"
        "print('SIGPIPE', signal.getsignal(signal.SIGPIPE))\n")
    argv = [sys.executable, "-u", str(script)]
    plain = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=60)
    (tmp_path / "unclosed.txt").unlink()
    worker = zygote.spawn(argv, dict(os.environ), str(tmp_path))
    out, err = worker.stdout.read(), worker.stderr.read()
    assert (worker.wait(30), out, err) == (plain.returncode, plain.stdout, plain.stderr)
    assert b"SUM 3" in out and b"PICKLED True" in out and b"SIGPIPE 1" in out  # SIG_IGN
    assert (tmp_path / "unclosed.txt").read_text() == "kept"


def test_torch_in_a_forked_worker_takes_the_workers_thread_count(tmp_path):
    """torch read OMP_NUM_THREADS when the zygote imported it; the worker's value must win,
    or every worker of a node would use every core."""
    script = tmp_path / "threads.py"
    script.write_text("import torch\nprint('THREADS', torch.get_num_threads())\n")
    argv = [sys.executable, "-u", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(argv, env=env, capture_output=True, timeout=120)
    z = Zygote(preload=("torch",))
    z.start()
    try:
        assert z.can_run(argv, env)
        worker = z.spawn(argv, env, str(tmp_path))
        assert worker.stdout.read() == plain.stdout == b"THREADS 1\n"
        assert worker.wait(30) == 0
        # A variable read at interpreter start that differs from the zygote's: not forked.
        assert not z.can_run(argv, {**env, "PYTHONHASHSEED": "7"})
    finally:
        z.close()


def test_a_newcomer_registers_once_its_zygote_is_ready_a_first_node_at_once(tmp_path, etcd_endpoint,
                                                                              run_id):
    """In restart mode the members restart for the newcomer's round and wait at their first
    collective for its workers: its imports must be done before it registers. A node of a new
    job has no one waiting for it: it registers while its zygote imports."""
    mark = new_mark()
    stop = tmp_path / "stop"
    preload = "torch,tests.integration.scripts.slow_import"
    common = ["--nnodes", "1:2", "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", run_id,
              "--rescale-mode", "restart", "--preload", preload]
    agents = []
    try:
        for name in ("first", "second"):
            env = {"SLOW_IMPORT_S": "3", "SLOW_IMPORT_DONE": str(tmp_path / f"{name}.imported")}
            agents.append(Agent([*common, "--log-dir", tmp_path / name, STEPS, "--stop-file", stop],
                                tmp_path, name, mark, env=env))
            world = len(agents)
            wait_for(lambda: f"world={world} rank={world - 1}" in agents[0].output()
                     + agents[-1].output(), timeout=120, what=f"training in a world of {world}")
        joined = {name: next(e["time"] for e in read_events(tmp_path / name)
                             if e["event"] == "joined") for name in ("first", "second")}
        imported = {name: float((tmp_path / f"{name}.imported").read_text())
                    for name in ("first", "second")}
        assert joined["first"] < imported["first"]
        assert joined["second"] >= imported["second"]
        stop.touch()
        assert [a.wait(60) for a in agents] == [0, 0]
    finally:
        for agent in agents:
            agent.stop()
    assert processes_with_mark(mark) == []
