"""One member of a workload on its node: a Ray actor (in the member's placement-group bundle) that
owns one process, the member's agent or gang command. The process dies with the actor's worker,
even by SIGKILL (PR_SET_PDEATHSIG), so a node's death takes its members' processes with it.

The class is plain Python; the controller wraps it with `ray.remote` (Ray is imported lazily).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from typing import Dict, List, Optional, Tuple

from launcher.network import free_port
from launcher.workers import die_with_agent

TAIL_BYTES = 16_384


class MemberProcess:
    def __init__(self, member: str, log_dir: str):
        self.member = member
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"{member}.log")
        self._proc: Optional[subprocess.Popen] = None
        self._runner: Optional[threading.Thread] = None
        self._started, self._ended = threading.Event(), threading.Event()
        self._code: Optional[int] = None
        self._error = ""
        self._lock = threading.Lock()

    def address(self) -> Tuple[str, int]:
        """This node's address and a free port on it (a gang's rank 0: MASTER_ADDR/PORT)."""
        import ray
        host = ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostname()
        return host, free_port()

    def start(self, argv: List[str], env: Dict[str, str], cwd: Optional[str] = None) -> int:
        """Start the process (once); its output goes to the member's log. Returns its pid."""
        with self._lock:
            if self._runner is None:
                self._runner = threading.Thread(target=self._run, args=(argv, env, cwd),
                                                name=f"member-{self.member}", daemon=True)
                self._runner.start()
        self._started.wait()
        if self._proc is None:
            raise RuntimeError(f"member {self.member}: {self._error}")
        return self._proc.pid

    def _run(self, argv, env, cwd) -> None:
        # The kernel sends PR_SET_PDEATHSIG when the *thread* that forked exits: this thread
        # forks and then outlives the process, whatever becomes of the actor's own threads.
        try:
            with open(self.log_path, "ab") as sink:
                self._proc = subprocess.Popen(
                    argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=cwd or os.getcwd(), env={**os.environ, **env},
                    preexec_fn=die_with_agent(os.getpid()))
        except OSError as exc:
            self._error = f"cannot start {argv[0]}: {exc}"
            self._code = 127
            with open(self.log_path, "a") as log:
                log.write(self._error + "\n")
        finally:
            self._started.set()
        if self._proc is not None:
            self._code = self._proc.wait()
        self._ended.set()

    def wait(self) -> Tuple[int, str]:
        """Block until the process has started and ended; its exit code (negative: a signal)
        and the end of its output."""
        self._started.wait()
        self._ended.wait()
        return self._code, self.tail()

    def status(self) -> Tuple[bool, Optional[int]]:
        """(started, exit code or None while it runs)."""
        return self._started.is_set(), self._code if self._ended.is_set() else None

    def tail(self, nbytes: int = TAIL_BYTES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - nbytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def terminate(self, grace: float = 10.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
