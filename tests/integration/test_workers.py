import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from launcher.workers import (
    WorkerGroup, WorkerSpec, WorkerStartError, WorldAssignment,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0  # upper bound for anything to happen; tests finish as soon as it does
POLL_S = 0.02

TORCHRUN_KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "ELASTIC_ROUND",
    "MY_SETTING",
)


def assignment(rank_offset=0, world_size=2, round=0, **overrides):
    fields = dict(
        run_id="job-1", round=round, group_rank=0, group_world_size=1, rank_offset=rank_offset,
        world_size=world_size, master_addr="127.0.0.1", master_port=29500, restart_count=0,
        max_restarts=0,
    )
    fields.update(overrides)
    return WorldAssignment(**fields)


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return (sys.executable, "-u", str(path))


def wait_until(condition, what):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def wait_for_status(group, status):
    states = []
    wait_until(lambda: states.append(group.poll()) or states[-1].status == status, status)
    return states[-1]


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def groups():
    made = []
    yield made
    for group in made:
        group.stop(signal.SIGKILL, 0)


def test_workers_get_the_torchrun_environment_and_prefixed_logged_output(
        tmp_path, capfd, monkeypatch, groups):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = script(tmp_path, "env_worker.py", f"""
        import json, os, sys
        print("ENV " + json.dumps({{k: os.environ.get(k) for k in {TORCHRUN_KEYS!r}}}))
        print("hello from stderr", file=sys.stderr)
    """)
    log_dir = tmp_path / "logs"
    group = WorkerGroup(WorkerSpec(argv=argv, nproc=2, log_dir=str(log_dir),
                                   extra_env={"MY_SETTING": "from-spec"}))
    groups.append(group)

    group.start(assignment(rank_offset=2, world_size=4, round=3, group_rank=1,
                           group_world_size=2, master_addr="10.0.0.7", master_port=29555,
                           restart_count=1, max_restarts=3))
    assert wait_for_status(group, "succeeded").failure is None
    group.stop()

    for local_rank, rank in ((0, 2), (1, 3)):
        log = (log_dir / "round3" / f"rank{rank}.log").read_text().splitlines()
        assert "hello from stderr" in log
        env = json.loads(next(line for line in log if line.startswith("ENV "))[4:])
        assert env == {
            "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2",
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": "4", "ROLE_NAME": "default",
            "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29555", "TORCHELASTIC_RUN_ID": "job-1",
            "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "3",
            "TORCHELASTIC_USE_AGENT_STORE": "False", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "ELASTIC_ROUND": "3", "MY_SETTING": "from-spec",
        }
    out, err = capfd.readouterr()
    assert sorted(line.split("ENV ")[0] for line in out.splitlines()) == ["[rank2]: ", "[rank3]: "]
    assert sorted(err.splitlines()) == ["[rank2]: hello from stderr", "[rank3]: hello from stderr"]


def test_all_workers_exiting_zero_is_success_and_omp_setting_is_kept(tmp_path, capfd, groups):
    argv = script(tmp_path, "ok.py", "import os; print('threads', os.environ['OMP_NUM_THREADS'])")
    group = WorkerGroup(WorkerSpec(argv=argv, nproc=2, extra_env={"OMP_NUM_THREADS": "3"}))
    groups.append(group)

    group.start(assignment())
    state = wait_for_status(group, "succeeded")
    assert group.running  # the round is held until stop(), exited or not
    group.stop()

    assert state.failure is None and not group.running
    assert sorted(capfd.readouterr().out.splitlines()) == ["[rank0]: threads 3",
                                                           "[rank1]: threads 3"]
    assert group.poll().status == "stopped" and group.pids == []


def test_first_failing_rank_is_reported_with_its_traceback(tmp_path, groups):
    go = tmp_path / "go"
    argv = script(tmp_path, "fail.py", f"""
        import os, sys, time
        if os.environ["RANK"] == "1":
            raise ValueError("boom from rank 1")
        while not os.path.exists({str(go)!r}):  # rank 0 fails only once the test says so
            time.sleep(0.02)
        sys.exit(7)
    """)
    group = WorkerGroup(WorkerSpec(argv=argv, nproc=2, echo=False))
    groups.append(group)
    group.start(assignment())

    failure = wait_for_status(group, "failed").failure
    assert (failure.rank, failure.local_rank, failure.exitcode) == (1, 1, 1)
    assert failure.pid == group.pids[1]
    assert failure.traceback.startswith("Traceback (most recent call last):")
    assert failure.traceback.rstrip().endswith("ValueError: boom from rank 1")
    assert "rank 1 (local rank 1" in failure.describe()
    assert "exited with code 1" in failure.describe()
    assert "boom from rank 1" in failure.describe()
    assert group.running  # rank 0 is still going: the agent decides what to do with it
    with pytest.raises(RuntimeError, match="stop"):
        group.start(assignment())

    rank0 = group.pids[0]
    go.touch()
    wait_until(lambda: gone(rank0), "rank 0 to exit")
    assert group.poll().failure == failure  # a later failure does not replace the first


def test_stop_kills_a_worker_ignoring_sigterm_and_its_children(tmp_path, groups):
    child = textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(120)
    """)
    argv = script(tmp_path, "stubborn.py", f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kids = [subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE,
                                 start_new_session=new_session) for new_session in (False, True)]
        for kid in kids:
            kid.stdout.readline()  # wait until each child ignores SIGTERM too
        print("CHILDREN", *[kid.pid for kid in kids], flush=True)
        time.sleep(120)
    """)
    log_dir = tmp_path / "logs"
    group = WorkerGroup(WorkerSpec(argv=argv, nproc=1, log_dir=str(log_dir), echo=False,
                                   grace_period_s=0.3))
    groups.append(group)
    group.start(assignment(world_size=1))
    log = log_dir / "round0" / "rank0.log"
    wait_until(lambda: log.exists() and "CHILDREN" in log.read_text(), "the children to start")
    children = [int(pid) for pid in log.read_text().split("CHILDREN")[1].split()]
    worker = group.pids[0]
    assert not gone(worker) and not any(gone(pid) for pid in children)

    group.stop()

    assert gone(worker)
    assert [gone(pid) for pid in children] == [True, True]
    assert group.poll().status == "stopped"
    group.stop()  # idempotent


def test_workers_die_when_the_agent_is_killed(tmp_path):
    agent_script = tmp_path / "agent.py"
    agent_script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from launcher.workers import WorkerGroup, WorkerSpec, WorldAssignment
        group = WorkerGroup(WorkerSpec(
            argv=(sys.executable, "-c", "import time; time.sleep(120)"), nproc=2, echo=False))
        group.start(WorldAssignment("job-1", 0, 0, 1, 0, 2, "127.0.0.1", 29500, 0, 0))
        print(*group.pids, flush=True)
        time.sleep(120)
    """))
    agent = subprocess.Popen([sys.executable, str(agent_script)], stdout=subprocess.PIPE,
                             text=True)
    try:
        workers = [int(pid) for pid in agent.stdout.readline().split()]
        assert len(workers) == 2
        assert [psutil.Process(pid).ppid() for pid in workers] == [agent.pid] * 2
    finally:
        agent.kill()
        agent.wait()
        agent.stdout.close()

    wait_until(lambda: all(gone(pid) for pid in workers), "the workers to die with the agent")


def test_missing_executable_is_a_clear_error(tmp_path):
    group = WorkerGroup(WorkerSpec(argv=(str(tmp_path / "no-such-trainer"), "--epochs", "2"),
                                   nproc=2))

    with pytest.raises(WorkerStartError, match="no-such-trainer") as info:
        group.start(assignment())

    assert "\n" not in str(info.value)
    assert group.pids == [] and not group.running
    assert group.poll().status == "stopped"


def test_workers_already_started_are_stopped_when_a_later_one_cannot_start(
        tmp_path, monkeypatch):
    real_popen, started = subprocess.Popen, []

    def popen_failing_second(*args, **kwargs):
        if started:
            raise FileNotFoundError(2, "No such file or directory")
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen_failing_second)
    group = WorkerGroup(WorkerSpec(argv=(sys.executable, "-c", "import time; time.sleep(120)"),
                                   nproc=2, echo=False))

    with pytest.raises(WorkerStartError):
        group.start(assignment())

    assert gone(started[0].pid)
    assert group.pids == []


def test_stop_before_start_does_nothing():
    group = WorkerGroup(WorkerSpec(argv=("true",), nproc=1))
    group.stop()
    assert group.poll().status == "stopped" and not group.running


def test_torch_rank_prefix_is_dropped_so_the_traceback_is_found_and_not_prefixed_twice(
        tmp_path, capfd, groups):
    # What torch's excepthook writes after init_process_group (nested after a re-initialisation).
    argv = script(tmp_path, "prefixed.py", """
        import sys
        for line in ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                     "ValueError: boom after init"]:
            print("[rank1]: [rank0]: " + line, file=sys.stderr)
        sys.exit(1)
    """)
    group = WorkerGroup(WorkerSpec(argv=argv, nproc=1))
    groups.append(group)
    group.start(assignment(rank_offset=1))

    failure = wait_for_status(group, "failed").failure
    assert failure.message == "ValueError: boom after init"
    assert failure.traceback.splitlines()[0] == "Traceback (most recent call last):"
    assert failure.describe().endswith("exited with code 1: ValueError: boom after init")
    group.stop()
    err = capfd.readouterr().err.splitlines()
    assert err[-1] == "[rank1]: ValueError: boom after init"
    assert not any("[rank0]" in line for line in err)


def test_error_file_written_by_torch_record_is_the_failure_cause(tmp_path, groups):
    argv = script(tmp_path, "recorded.py", """
        from torch.distributed.elastic.multiprocessing.errors import record

        @record
        def main():
            raise ValueError("boom, recorded")

        main()
    """)
    group = WorkerGroup(WorkerSpec(argv=argv, nproc=1, echo=False))
    groups.append(group)
    group.start(assignment(world_size=1))

    failure = wait_for_status(group, "failed").failure
    assert failure.message == "ValueError: boom, recorded"
    assert "raise ValueError" in failure.traceback  # the traceback came with it
    assert failure.describe().endswith(": ValueError: boom, recorded")


def test_the_rank_that_died_first_is_the_cause_even_if_a_lower_rank_died_too(tmp_path, groups):
    argv = script(tmp_path, "cascade.py", """
        import os, time
        if os.environ["RANK"] == "1":
            raise ValueError("the real cause")
        time.sleep(0.5)  # rank 0 fails after it, as a peer of a dead rank does in a collective
        raise RuntimeError("Connection closed by peer")
    """)
    group = WorkerGroup(WorkerSpec(argv=argv, nproc=2, echo=False))
    groups.append(group)
    group.start(assignment())
    pids = group.pids
    wait_until(lambda: all(gone(pid) for pid in pids), "both ranks to exit")

    failure = wait_for_status(group, "failed").failure
    assert failure.rank == 1 and failure.message == "ValueError: the real cause"


def test_a_rank_that_raised_is_the_cause_though_its_peer_exits_while_it_finalizes(tmp_path,
                                                                                   groups):
    cut = tmp_path / "cut"
    argv = script(tmp_path, "slow_exit.py", f"""
        import atexit, os, pathlib, time
        cut = pathlib.Path({str(cut)!r})
        if os.environ["RANK"] == "0":
            # After its traceback is printed: it cuts its peer off, then takes a while to exit.
            atexit.register(lambda: (cut.touch(), time.sleep(0.3)))
            raise ValueError("the real cause")
        while not cut.exists():
            time.sleep(0.01)
        raise RuntimeError("Connection closed by peer")
    """)
    group = WorkerGroup(WorkerSpec(argv=argv, nproc=2, echo=False))
    groups.append(group)
    group.start(assignment())

    failure = wait_for_status(group, "failed").failure  # polled as the agent does, from the start
    assert failure.rank == 0 and failure.message == "ValueError: the real cause"
