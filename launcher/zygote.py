"""A zygote per node: a process that imports torch (and the modules named by --preload) once and
forks workers from that state on demand, so that a restart-mode rescale or a worker restart skips
the interpreter's start and `import torch` in every new worker.

The agent starts it (`Zygote.start`) and asks it for workers (`Zygote.spawn`); a worker it forks is
run as `python -u SCRIPT ARGS` or `python -u -m MODULE ARGS` would run it: its own session, stdin
from /dev/null, stdout and stderr to the agent's pipes, the environment and working directory the
agent gives, `sys.argv`, `sys.path[0]` and `__main__` as the interpreter sets them, atexit
handlers and non-daemon threads honoured at exit. Forking is safe only from a process with one
thread and no CUDA context: the zygote checks both after its imports and declines otherwise, and
the agent then spawns as before; it also spawns as before for a command that is not this
interpreter running a script or module (`--no-python`, other interpreter options) or an
environment whose PYTHONPATH differs from the zygote's (its sys.path was fixed at start).

Messages over a Unix SOCK_SEQPACKET pair, one JSON object per packet:
    zygote -> agent  {"ready": true} | {"ready": false, "error": ...}   once, after the imports
    agent -> zygote  {"id", "argv", "env", "cwd"}, the worker's stdout and stderr attached
    zygote -> agent  {"id", "pid"} | {"id", "error"}
    zygote -> agent  {"exited": pid, "code": returncode, "time": unix time}  (it reaps them)

Workers die with their agent: the zygote has PR_SET_PDEATHSIG(SIGKILL) towards the agent, and
each worker towards the zygote (checked after asking, as a spawned worker does).
"""
from __future__ import annotations

import builtins
import ctypes
import errno
import importlib
import io
import json
import logging
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import types
from typing import Dict, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

# torch._dynamo: torch.optim's first optimizer imports it (2-3 s here), in every new worker.
DEFAULT_PRELOAD = ("torch", "torch.distributed", "torch._dynamo")
READY_TIMEOUT_S = 120.0  # importing torch on a busy machine
REPLY_TIMEOUT_S = 30.0
_PACKET = 1 << 20
_PR_SET_PDEATHSIG = 1


# Variables read when the interpreter or the preloaded modules start: a worker whose values
# differ from the zygote's is spawned as a new process (OMP_NUM_THREADS is applied in the fork).
_IMPORT_TIME = ("PYTHON", "LD_", "MKL_", "KMP_", "GOMP_", "TORCH_")
_NOT_IMPORT_TIME = {"PYTHONUNBUFFERED"}  # the fork is unbuffered anyway, as `-u`


def _import_time_env(env: Mapping[str, str]) -> Dict[str, str]:
    return {k: v for k, v in env.items()
            if k.startswith(_IMPORT_TIME) and k not in _NOT_IMPORT_TIME}


def _prctl():
    """prctl, resolved before any fork (dlopen in a child forked from threads may deadlock)."""
    fn = ctypes.CDLL(None, use_errno=True).prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def _die_with_parent(parent_pid: int, prctl) -> None:
    if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0 or os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the request took effect


def parse_command(argv: Sequence[str]) -> Optional[Tuple[str, str, Tuple[str, ...]]]:
    """("script" | "module", target, args) for `python [-u] SCRIPT ...` or `python [-u] -m MOD
    ...` run by this interpreter; None for anything a fork cannot reproduce exactly."""
    # Not realpath: a virtual environment's python links to its base interpreter, and another
    # environment's must not be forked from this one.
    if len(argv) < 2 or os.path.abspath(argv[0]) != os.path.abspath(sys.executable):
        return None
    rest = list(argv[1:])
    while rest and rest[0] == "-u":
        rest.pop(0)
    if not rest:
        return None
    if rest[0] == "-m":
        return ("module", rest[1], tuple(rest[2:])) if len(rest) > 1 else None
    if rest[0].startswith("-") or not os.path.isfile(rest[0]):
        return None  # another interpreter option, or a directory or zip to run
    return "script", rest[0], tuple(rest[1:])


# -- the agent's side ------------------------------------------------------------------------------
class ZygoteWorker:
    """A worker forked by the zygote, with the part of subprocess.Popen that WorkerGroup uses."""

    def __init__(self, pid: int, stdout: io.BufferedReader, stderr: io.BufferedReader) -> None:
        self.pid, self.stdout, self.stderr = pid, stdout, stderr
        self.returncode: Optional[int] = None
        self.exited_at: Optional[float] = None
        self.exited = threading.Event()

    def _exit(self, code: int, when: float) -> None:
        self.returncode, self.exited_at = code, when
        self.exited.set()

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self.exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class Zygote:
    """The agent's handle on its zygote process."""

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self.preload = tuple(preload)
        self._proc: Optional[subprocess.Popen] = None
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()  # one request at a time
        self._replies: Dict[int, dict] = {}
        self._cond = threading.Condition()
        self._workers: Dict[int, ZygoteWorker] = {}
        self._next_id = 0
        self._import_env: Dict[str, str] = {}
        self._abandoned: set = set()  # requests given up on: a late fork is killed
        self._killed: set = set()
        self._ready = threading.Event()  # the imports are done, or failed
        self.available = False
        self.why_not = "not started"

    def start(self) -> None:
        """Start the zygote; its imports go on in the background (`can_run` waits for them).
        Call it from a long-lived thread: PR_SET_PDEATHSIG follows the thread that forks."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        agent_pid, prctl = os.getpid(), _prctl()
        self._import_env = _import_time_env(os.environ)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "launcher.zygote", str(theirs.fileno()), str(agent_pid),
                 ",".join(self.preload)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                preexec_fn=lambda: _die_with_parent(agent_pid, prctl), start_new_session=True)
        except OSError as exc:
            ours.close()
            self.why_not = f"cannot start: {exc}"
            self._ready.set()
            return
        finally:
            theirs.close()
        self._sock = ours
        self.why_not = "still importing"
        threading.Thread(target=self._read, name="zygote", daemon=True).start()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait for the imports (at most `timeout`); True if the zygote can fork."""
        self._ready.wait(timeout)
        return self.available

    def can_run(self, argv: Sequence[str], env: Mapping[str, str],
                wait: float = READY_TIMEOUT_S) -> bool:
        """Whether spawn() can fork this command (waiting for the zygote's imports at most
        `wait`: a worker spawned meanwhile would spend the same time importing)."""
        if parse_command(argv) is None or _import_time_env(env) != self._import_env:
            return False
        if not self._ready.wait(wait):
            log.warning("the zygote did not finish importing %s within %.0f s; workers are "
                        "started as new processes", ",".join(self.preload), wait)
            self.why_not = "its imports did not finish in time"
            self.close()
        return self.available

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> ZygoteWorker:
        """Fork a worker running argv. Raises OSError when the zygote cannot (the caller then
        spawns the usual way)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            with self._lock:
                self._next_id += 1
                request_id = self._next_id
                request = {"id": request_id, "argv": list(argv), "env": dict(env), "cwd": cwd}
                socket.send_fds(self._sock, [json.dumps(request).encode()], [out_w, err_w])
            reply = self._reply(request_id)
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        if "pid" not in reply:
            os.close(out_r)
            os.close(err_r)
            raise OSError(errno.EAGAIN, f"the zygote could not fork: {reply.get('error')}")
        worker = ZygoteWorker(reply["pid"], os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"))
        with self._cond:
            early = self._replies.pop(-reply["pid"], None)  # exited before we got here
            gone = not self.available  # the zygote died since: so did this worker
            if not gone:
                self._workers[worker.pid] = worker
        if early is not None:
            worker._exit(early["code"], early["time"])
        elif gone:
            worker._exit(-int(signal.SIGKILL), time.time())
        return worker

    def _reply(self, request_id: int) -> dict:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        with self._cond:
            while request_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or not self.available:
                    self._abandoned.add(request_id)  # the caller spawns it another way
                    raise OSError(errno.ETIMEDOUT, "the zygote did not answer")
                self._cond.wait(left)
            return self._replies.pop(request_id)

    def _read(self) -> None:
        try:
            hello = json.loads(self._sock.recv(_PACKET) or b"{}")
        except (OSError, ValueError) as exc:
            hello = {"ready": False, "error": f"no answer: {exc}"}
        if not hello.get("ready"):
            self.why_not = hello.get("error") or "it exited while importing"
            log.warning("no zygote (%s); workers are started as new processes", self.why_not)
            self._ready.set()
            return
        self.available, self.why_not = True, ""
        self._ready.set()
        while True:
            try:
                data = self._sock.recv(_PACKET)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            if "exited" in message:
                with self._cond:
                    known = message["exited"] in self._workers
                    if message["exited"] in self._killed:
                        self._killed.discard(message["exited"])
                    elif not known:  # its spawn() has not registered it yet
                        self._replies[-message["exited"]] = message
                if known:
                    self._exited(message)
            else:
                with self._cond:
                    late = message["id"] in self._abandoned
                    self._abandoned.discard(message["id"])
                    if not late:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                if late and "pid" in message:  # its worker was started another way meanwhile
                    self._killed.add(message["pid"])
                    try:
                        os.kill(message["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        # The zygote is gone, and its workers with it (PR_SET_PDEATHSIG).
        with self._cond:
            self.available, self.why_not = False, "the zygote exited"
            workers, self._workers = dict(self._workers), {}
            self._cond.notify_all()
        for worker in workers.values():
            if worker.returncode is None:
                worker._exit(-int(signal.SIGKILL), time.time())

    def _exited(self, message: dict) -> None:
        with self._cond:
            worker = self._workers.pop(message["exited"], None)
        if worker is not None:
            worker._exit(message["code"], message["time"])

    def close(self) -> None:
        """Stop the zygote (its workers, if any are left, die with it)."""
        self.available = False
        self._ready.set()
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()


# -- the zygote's side -----------------------------------------------------------------------------
def _serve(sock: socket.socket, agent_pid: int, preload: Sequence[str]) -> None:
    prctl = _prctl()
    _die_with_parent(agent_pid, prctl)
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException as exc:  # report and stop: the agent spawns as before
        sock.send(json.dumps({"ready": False, "error": f"import of {name} failed: "
                              f"{type(exc).__name__}: {exc}"}).encode())
        return
    if threading.active_count() > 1:
        sock.send(json.dumps({"ready": False, "error": f"{threading.active_count()} threads "
                              "run after the imports; forking would be unsafe"}).encode())
        return
    cuda = sys.modules.get("torch.cuda")
    if cuda is not None and cuda.is_initialized():
        sock.send(json.dumps({"ready": False, "error": "a CUDA context exists after the "
                              "imports; forking would be unsafe"}).encode())
        return
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sock.send(json.dumps({"ready": True}).encode())
    zygote_pid = os.getpid()
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        _reap(sock)
        if sock in readable:
            data, fds, _, _ = socket.recv_fds(sock, _PACKET, 2)
            if not data:
                return  # the agent closed its end: its workers are its to stop
            request = json.loads(data)
            try:
                pid = os.fork()
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                sock.send(json.dumps({"id": request["id"], "error": str(exc)}).encode())
                continue
            if pid == 0:
                try:
                    _become_worker(request, fds, zygote_pid, prctl, keep=(sock, wake_r, wake_w))
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                _run(request)  # raises SystemExit: the interpreter then exits as usual
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"id": request["id"], "pid": pid}).encode())


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status),
                              "time": time.time()}).encode())


def _become_worker(request: dict, fds: Sequence[int], zygote_pid: int, prctl, keep) -> None:
    """In the forked child: the process state a new `python -u` worker would have."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()
    _die_with_parent(zygote_pid, prctl)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (devnull, *fds):
        os.close(fd)
    keep[0].close()
    for fd in keep[1:]:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    torch = sys.modules.get("torch")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))  # torch read the zygote's value at import
    # As `python -u`: nothing waits in a buffer when the worker is killed.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                  errors="backslashreplace")
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
    # The zygote's own package must not shadow one of the worker's of the same name.
    for name in [n for n in sys.modules if n == "launcher" or n.startswith("launcher.")]:
        del sys.modules[name]


def _run(request: dict) -> None:
    """Run the worker's script or module in a fresh __main__ that stays for the rest of the
    process (atexit handlers and threads may pickle what it defines); raise SystemExit with
    its exit code, so that the interpreter exits as it would have: non-daemon threads and
    executors joined, atexit run, files closed."""
    kind, target, args = parse_command(request["argv"])
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    try:
        if kind == "module":
            sys.argv = [target, *args]
            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(target, alter_argv=True)  # what `python -m` calls
        else:
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(os.path.realpath(target))
            main.__file__ = target
            main.__cached__ = None
            with io.open_code(target) as f:
                code = compile(f.read(), target, "exec")
            exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        sys.excepthook(type(exc), exc, _own_frames_dropped(exc.__traceback__))
        if isinstance(exc, KeyboardInterrupt):  # exit as Python does: killed by SIGINT
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        raise SystemExit(1)
    raise SystemExit(0)


def _own_frames_dropped(tb):
    """The traceback from the worker's first frame on, as `python script.py` would print it."""
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__)}
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) in ours:
        tb = tb.tb_next
    return tb


def main() -> None:
    fd, agent_pid, preload = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sock = socket.socket(fileno=fd)
    _serve(sock, agent_pid, [name for name in preload.split(",") if name])


if __name__ == "__main__":
    main()
