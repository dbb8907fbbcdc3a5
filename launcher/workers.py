"""One node's worker processes: start them with the torchrun environment for a round, stream and
log their output, notice the first failure, and stop them without leaving orphans behind.

The agent owns one WorkerGroup and drives it round by round: start(assignment), poll() from its
loop, stop() when the round ends or the membership changes. Linux only (prctl PDEATHSIG).
"""
from __future__ import annotations

import collections
import ctypes
import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Mapping, Optional, Tuple

import psutil

from elastic import contract
from elastic.contract import WorkerWorld
from rendezvous.scratch import make_scratch

from .zygote import ZygoteWorker

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 200
TRACEBACK_MAX_LINES = 50
TRACEBACK_HEADER = "Traceback (most recent call last):"
# A grandchild that escaped our kill could hold a worker's pipe open; never wait on it for long.
READER_JOIN_TIMEOUT_S = 2.0
# When one rank fails, how long its still-running peers may take to fail too before the root
# cause is picked: a rank that raised may still be finalizing while the peer it cut off in a
# collective has already exited. Peers hung in a collective cost the restart this much.
ROOT_CAUSE_WAIT_S = 0.5
# A traceback printed at most this long before the exit is the failure: it is timed when printed.
TRACEBACK_BEFORE_EXIT_S = 10.0
STOP_POLL_INTERVAL_S = 0.05
KILL_WAIT_S = 10.0
_PR_SET_PDEATHSIG = 1
# torch's excepthook (installed by init_process_group) prefixes every line of a traceback with
# "[rank<N>]: ", once per initialisation: in-place workers that re-initialised show it nested.
# We add our own prefix, so theirs is dropped (otherwise "[rank1]: [rank1]: Traceback ...").
TORCH_RANK_PREFIX = re.compile(r"^(?:\[rank\d+\]: )+")
SCRATCH_PREFIX = "elastic-workers-"

# Shared by every group so that console lines of different ranks never interleave mid-line.
_CONSOLE_LOCK = threading.Lock()


class WorkerStartError(RuntimeError):
    """A worker process could not be started (for example its executable does not exist)."""


@dataclass(frozen=True)
class WorkerSpec:
    """How this node runs its workers; the same for every round."""

    argv: tuple[str, ...]
    nproc: int
    log_dir: Optional[str] = None
    grace_period_s: float = 5.0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    echo: bool = True
    # A backend's per-worker variables (Horovod's ranks and rendezvous), called at each spawn.
    rank_env: Optional[Callable[["WorldAssignment", int], Mapping[str, str]]] = None
    role: str = "default"  # ROLE_NAME, as torchrun's --role
    # local rank -> streams ("stdout", "stderr") kept off the console (--redirects,
    # --local-ranks-filter); the log files and the failure report still have them.
    console_quiet: Mapping[int, frozenset] = field(default_factory=dict)
    # This node's zygote (launcher.zygote.Zygote): forks workers with torch already imported.
    zygote: Optional[Any] = field(default=None, compare=False)
    # Per local rank, variables of its own for every round: its GPUs (launcher.devices).
    local_env: Tuple[Mapping[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("the worker command is empty; pass the training script to run")
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        if self.nproc < 1:
            raise ValueError(f"nproc (workers per node) must be at least 1, got {self.nproc}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace period must not be negative, got {self.grace_period_s}")
        if self.local_env and len(self.local_env) != self.nproc:
            raise ValueError(f"local_env has {len(self.local_env)} entries for {self.nproc} "
                             "workers")


@dataclass(frozen=True)
class WorldAssignment:
    """What this node's workers are told for one round."""

    run_id: str
    round: int
    group_rank: int
    group_world_size: int
    rank_offset: int
    world_size: int
    master_addr: str
    master_port: int
    restart_count: int
    max_restarts: int
    env: Mapping[str, str] = field(default_factory=dict)  # round-specific, e.g. the batch plan
    member_nprocs: Tuple[int, ...] = ()  # workers of each member node in rank order, if known

    def __post_init__(self) -> None:
        if not 0 <= self.group_rank < self.group_world_size:
            raise ValueError(
                f"group rank {self.group_rank} is outside a round of {self.group_world_size} nodes"
            )
        if self.rank_offset < 0 or self.world_size < 1:
            raise ValueError(f"bad ranks: offset {self.rank_offset}, world size {self.world_size}")
        if self.member_nprocs and (len(self.member_nprocs) != self.group_world_size
                                   or sum(self.member_nprocs) != self.world_size):
            raise ValueError(f"member workers {list(self.member_nprocs)} do not make a world of "
                             f"{self.world_size} on {self.group_world_size} nodes")


@dataclass(frozen=True)
class WorkerFailure:
    """The first worker of a round that exited non-zero; exitcode is -signum if it was killed."""

    rank: int
    local_rank: int
    pid: int
    exitcode: int
    time: float  # when it failed: its last traceback was printed, else when it exited
    traceback: str
    message: str = ""  # the exception ("ValueError: boom"), from the error file or the traceback

    def describe(self) -> str:
        who = f"rank {self.rank} (local rank {self.local_rank}, pid {self.pid})"
        signum = -self.exitcode
        if signum > 0:
            # Real-time signals (SIGRTMIN+n) have no name in signal.Signals.
            name = {s.value: s.name for s in signal.Signals}.get(signum, signum)
            what = f"was killed by signal {name}"
        else:
            what = f"exited with code {self.exitcode}"
        cause = self.message or exception_line(self.traceback)
        return f"{who} {what}" + (f": {cause}" if cause else "")


@dataclass(frozen=True)
class GroupState:
    """status: running | succeeded (all exited 0) | failed (any exited non-zero) | stopped."""

    status: str
    failure: Optional[WorkerFailure] = None


def worker_world(spec: WorkerSpec, a: WorldAssignment, local_rank: int) -> WorkerWorld:
    """A local rank's place in the world of a round assigned to this node."""
    return WorkerWorld(
        run_id=a.run_id, round=a.round, rank=a.rank_offset + local_rank, local_rank=local_rank,
        world_size=a.world_size, local_world_size=spec.nproc, group_rank=a.group_rank,
        group_world_size=a.group_world_size, master_addr=a.master_addr,
        master_port=a.master_port, restart_count=a.restart_count, max_restarts=a.max_restarts,
        role=spec.role, plan_env=a.env)


def worker_env(
    base: Mapping[str, str], spec: WorkerSpec, assignment: Optional[WorldAssignment],
    local_rank: int, error_file: Optional[str] = None
) -> dict[str, str]:
    """One worker's environment: base (the agent's), then extra_env and its local rank's
    local_env (its GPUs), then its world's variables (`elastic.contract.world_env`), then the
    backend's (spec.rank_env). Without an assignment (standby) the worker gets no world: it
    waits for one on its agent channel. error_file becomes TORCHELASTIC_ERROR_FILE, where
    torch's @record writes an uncaught exception."""
    env = dict(base)
    env.update(spec.extra_env)
    if spec.local_env:
        env.update(spec.local_env[local_rank])
    env.setdefault(contract.OMP_NUM_THREADS, "1")  # as torchrun: N workers x all cores oversubscribes
    if error_file is not None:
        env[contract.ERROR_FILE] = error_file
    if assignment is None:
        env.update(contract.standby_env(local_rank, spec.nproc))
        return env
    env.update(contract.world_env(worker_world(spec, assignment, local_rank)))
    if spec.rank_env is not None:
        env.update(spec.rank_env(assignment, local_rank))
    return env


@functools.lru_cache(maxsize=None)
def _prctl():
    # Resolved in the agent: between fork and exec the child should run as little as possible.
    fn = ctypes.CDLL(None, use_errno=True).prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def die_with_agent(agent_pid: int):
    """preexec_fn making the kernel SIGKILL the worker when the agent dies, even by SIGKILL."""
    prctl, sigkill = _prctl(), int(signal.SIGKILL)

    def preexec() -> None:
        # If the agent died before the request took effect, nobody would ever kill this worker.
        if prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0) != 0 or os.getppid() != agent_pid:
            os._exit(1)

    return preexec


def exception_line(traceback: str) -> str:
    """The last non-blank line of a traceback: the exception and its message."""
    last = [line for line in traceback.splitlines() if line.strip()]
    return last[-1].strip() if last else ""


def read_error_file(path: str) -> Tuple[str, str]:
    """(exception line, traceback) from a torchrun error file; ("", "") if there is none.

    torch writes {"message": {"message": "ValueError: boom", "extraInfo": {"py_callstack": ...,
    "timestamp": ...}}}; a plain string message is accepted too."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return "", ""
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, str):
        return message.strip(), ""
    if not isinstance(message, dict):
        return "", ""
    extra = message.get("extraInfo") or {}
    tb = extra.get("py_callstack", "") if isinstance(extra, dict) else ""
    return str(message.get("message", "")).strip(), _clip(str(tb).rstrip().splitlines())


def _clip(tb: list) -> str:
    if len(tb) > TRACEBACK_MAX_LINES:  # keep the header and the end, where the error is
        tb = [tb[0], "  ..."] + tb[-(TRACEBACK_MAX_LINES - 2):]
    return "\n".join(tb)


def _last_traceback(lines: Iterable[str]) -> str:
    lines = list(lines)
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].startswith(TRACEBACK_HEADER):
            return _clip(lines[start:])
    return ""


def _alive(proc: psutil.Process) -> bool:
    try:  # a zombie is dead; it only waits for a parent (maybe a non-reaping init) to collect it
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Worker:
    """One spawned rank: its process, the threads reading its pipes, its log and recent stderr."""

    def __init__(self, local_rank: int, rank: int, proc: subprocess.Popen, log: Optional[IO[str]],
                 error_file: Optional[str] = None):
        self.local_rank, self.rank, self.proc, self.log = local_rank, rank, proc, log
        self.error_file = error_file
        self.log_lock = threading.Lock()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.readers: list[threading.Thread] = []
        self.exited_at: Optional[float] = None
        self.traceback_at: Optional[float] = None  # when its stderr last began a traceback
        threading.Thread(target=self._watch_exit, name=f"exit-{proc.pid}", daemon=True).start()

    def _watch_exit(self) -> None:
        """Note when the process exits, without reaping it (Popen.poll does that): when several
        ranks fail, the first to die is the root cause, the others fail in collectives after."""
        if isinstance(self.proc, ZygoteWorker):  # the zygote reaps it and says when
            self.proc.exited.wait()
            self.exited_at = self.proc.exited_at
            return
        try:
            os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass  # already reaped by poll()
        self.exited_at = time.time()

    def pump(self, pipe: IO[bytes], console: str, echo: bool) -> None:
        with pipe:
            for raw in pipe:
                prefix = f"[{_label(self.rank, self.local_rank)}]: "  # in-place ranks change
                text = raw.decode("utf-8", errors="replace").rstrip("\n")
                line = TORCH_RANK_PREFIX.sub("", text) + "\n"
                if console == "stderr":
                    self.stderr_tail.append(line[:-1])
                    if line.startswith(TRACEBACK_HEADER):
                        self.traceback_at = time.time()
                with self.log_lock:
                    if self.log is not None:
                        self.log.write(line)
                        self.log.flush()
                if echo:
                    with _CONSOLE_LOCK:
                        stream = getattr(sys, console)  # looked up per line: it may be replaced
                        try:
                            stream.write(prefix + line)
                            stream.flush()
                        except (OSError, ValueError):  # console gone; keep draining the pipe
                            echo = False

    def failed_at(self) -> float:
        """When it failed: a rank that raised failed when the traceback came out, before its
        interpreter finalized (a peer it cut off may exit first); else when it exited."""
        exited = self.exited_at or time.time()
        printed = self.traceback_at
        if printed is not None and 0 <= exited - printed <= TRACEBACK_BEFORE_EXIT_S:
            return printed
        return exited

    def close_log(self) -> None:
        with self.log_lock:
            if self.log is not None:
                self.log.close()
                self.log = None


def _label(rank: Optional[int], local_rank: int) -> str:
    return f"rank{rank}" if rank is not None else f"standby{local_rank}"


def _send(sig: int, groups: set[int], descendants: list[psutil.Process]) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is gone already
    for proc in descendants:  # those that left their worker's group (setsid, daemons)
        try:
            if os.getpgid(proc.pid) not in groups:
                proc.send_signal(sig)
        except (OSError, psutil.Error):
            pass


def _wait_gone(workers: list[_Worker], descendants: list[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        any(w.proc.poll() is None for w in workers) or any(_alive(p) for p in descendants)
    ):
        time.sleep(STOP_POLL_INTERVAL_S)


class WorkerGroup:
    """This node's workers for the current round.

    start() must be called from a long-lived thread (the agent's main thread): the kernel sends
    PR_SET_PDEATHSIG when the *thread* that forked a worker exits, not only when the agent does.
    """

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self._workers: list[_Worker] = []
        self._failure: Optional[WorkerFailure] = None
        self._failure_seen: Optional[float] = None  # monotonic time a failed worker was seen
        self._scratch: Optional[str] = None  # the workers' error files; removed by close()
        self.started_at = 0.0  # when start() last spawned the workers

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    @property
    def running(self) -> bool:
        """True from start() until stop(), whether or not the workers have exited yet: the
        round's processes, pipes and logs are held until stop(); poll() says how they are."""
        return bool(self._workers)

    def start(self, assignment: Optional[WorldAssignment]) -> None:
        """Spawn spec.nproc workers for one round, or in standby (assignment None: pre-warmed
        in-place workers that wait for a round on their agent channel).

        Raises:
            RuntimeError: the group is already running a round; stop() it first.
            ValueError: this node's ranks do not fit in the assignment's world size.
            WorkerStartError: a worker could not be started; those already started are stopped.
        """
        if self.running:
            raise RuntimeError("the workers of a round are still held; stop() them first")
        if assignment is not None and assignment.rank_offset + self.spec.nproc > assignment.world_size:
            raise ValueError(
                f"ranks {assignment.rank_offset}..{assignment.rank_offset + self.spec.nproc - 1}"
                f" do not fit in a world of {assignment.world_size}"
            )
        round_dir = None
        if self.spec.log_dir is not None:
            name = f"round{assignment.round}" if assignment else "standby"
            round_dir = os.path.join(self.spec.log_dir, name)
            os.makedirs(round_dir, exist_ok=True)
        preexec, base = die_with_agent(os.getpid()), dict(os.environ)
        self.started_at = time.time()
        if self._scratch is None:
            self._scratch = make_scratch(SCRATCH_PREFIX)
        for local_rank in range(self.spec.nproc):
            rank = assignment.rank_offset + local_rank if assignment else None
            file = f"rank{rank}.log" if assignment else f"local{local_rank}.log"
            log = open(os.path.join(round_dir, file), "a", encoding="utf-8") \
                if round_dir else None
            error_file = os.path.join(self._scratch, f"error-local{local_rank}.json")
            if os.path.exists(error_file):
                os.unlink(error_file)  # a file left by this rank's previous process
            env = worker_env(base, self.spec, assignment, local_rank, error_file)
            try:
                proc = self._fork(env)
                if proc is None:
                    proc = subprocess.Popen(
                        self.spec.argv, env=env,
                        stdin=subprocess.DEVNULL,  # workers must not compete for the agent's tty
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        start_new_session=True, preexec_fn=preexec,
                    )
            except OSError as exc:
                if log is not None:
                    log.close()
                self.stop(signal.SIGKILL, 0)
                raise WorkerStartError(
                    f"cannot start worker {_label(rank, local_rank)}: {exc.strerror}: "
                    f"{self.spec.argv[0]!r}"
                    f" (command: {shlex.join(self.spec.argv)}); check the path to the executable"
                ) from exc
            worker = _Worker(local_rank, rank, proc, log, error_file)
            quiet = self.spec.console_quiet.get(local_rank, ())
            for pipe, console in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                reader = threading.Thread(
                    target=worker.pump, args=(pipe, console, self.spec.echo and console not in quiet),
                    name=f"{_label(rank, local_rank)}-{console}", daemon=True,
                )
                reader.start()
                worker.readers.append(reader)
            self._workers.append(worker)

    def _fork(self, env: Mapping[str, str]) -> Optional[Any]:
        """A worker forked by the node's zygote, or None: no zygote, a command it cannot run,
        or it failed (then the worker is spawned as a new process)."""
        zygote = self.spec.zygote
        if zygote is None or not zygote.can_run(self.spec.argv, env):
            return None
        try:
            return zygote.spawn(self.spec.argv, env, os.getcwd())
        except OSError as exc:
            log.warning("the zygote could not fork a worker (%s); starting it as a new process",
                        exc)
            return None

    def set_ranks(self, rank_offset: int) -> None:
        """In-place workers entered a new world: label their output with their new ranks."""
        for worker in self._workers:
            worker.rank = rank_offset + worker.local_rank

    def poll(self) -> GroupState:
        """Where the round stands, without blocking (beyond draining a failed worker's stderr)."""
        if not self._workers:
            return GroupState("stopped")
        codes = [w.proc.poll() for w in self._workers]
        if self._failure is None:
            failed = [(w, c) for w, c in zip(self._workers, codes) if c is not None and c != 0]
            if failed:
                now = time.monotonic()
                if self._failure_seen is None:
                    self._failure_seen = now
                if any(c is None for c in codes) and now < self._failure_seen + ROOT_CAUSE_WAIT_S:
                    return GroupState("running")  # the others may be failing too: wait a little
                for w, _ in failed:  # their tracebacks are read to the end before comparing
                    w.readers[1].join(ROOT_CAUSE_WAIT_S)
                # The root cause is the rank that failed first; its peers fail after it.
                worker, code = min(failed, key=lambda wc: wc[0].failed_at())
                self._failure = self._failure_of(worker, code)
        if self._failure is not None:
            return GroupState("failed", self._failure)
        if all(code == 0 for code in codes):
            for worker in self._workers:  # so that the last lines are out before we say "done"
                for reader in worker.readers:
                    reader.join(READER_JOIN_TIMEOUT_S)
            return GroupState("succeeded")
        return GroupState("running")

    def _failure_of(self, worker: _Worker, code: int) -> WorkerFailure:
        """The failure of one worker: what it wrote to its error file (torch's @record), else
        the last traceback in its stderr."""
        worker.readers[1].join(READER_JOIN_TIMEOUT_S)  # the stderr reader: the traceback is last
        message, tb = read_error_file(worker.error_file) if worker.error_file else ("", "")
        if not tb:
            tb = _last_traceback(worker.stderr_tail)
        return WorkerFailure(
            rank=worker.rank, local_rank=worker.local_rank, pid=worker.proc.pid, exitcode=code,
            time=worker.failed_at(), traceback=tb, message=message or exception_line(tb),
        )

    def stop(self, sig: int = signal.SIGTERM, grace_period_s: Optional[float] = None) -> None:
        """Send sig to every worker's process group, SIGKILL what is left after the grace period
        (descendants that left the group included), reap, and close the logs. Idempotent."""
        workers, self._workers, self._failure = self._workers, [], None
        self._failure_seen = None
        if not workers:
            return
        grace = self.spec.grace_period_s if grace_period_s is None else grace_period_s
        groups = {w.proc.pid for w in workers}  # start_new_session: each worker leads its group
        # Collected before signalling: once a worker dies its children are re-parented and can
        # no longer be found from it.
        descendants: list[psutil.Process] = []
        for w in workers:
            if w.proc.poll() is None:  # unreaped, so the pid is still this worker's
                try:
                    descendants += psutil.Process(w.proc.pid).children(recursive=True)
                except psutil.Error:
                    pass
        _send(sig, groups, descendants)
        _wait_gone(workers, descendants, grace)
        # Also to the groups of workers that exited: their members may outlive them.
        _send(signal.SIGKILL, groups, descendants)
        _wait_gone(workers, descendants, KILL_WAIT_S)  # reaps the workers
        for w in workers:
            for reader in w.readers:
                reader.join(READER_JOIN_TIMEOUT_S)
            w.close_log()

    def close(self) -> None:
        """Stop the workers and remove the group's scratch directory."""
        self.stop()
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
