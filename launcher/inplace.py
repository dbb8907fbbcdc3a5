"""The agent's bookkeeping for in-place workers: who said hello, who is ready or running where,
when each last made progress (for hang detection), and the round messages they are sent (over
launcher.control, in the messages of elastic.contract)."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence, Tuple

from elastic.contract import (AGENT_ADDR, Hello, Leave, Message, Progress, Ready, RoundMessage,
                              Running)

from .control import ControlServer
from .workers import WorkerSpec, WorldAssignment, worker_world


class InPlaceWorkers:
    def __init__(self, spec: WorkerSpec, wake: Callable[[], None]):
        self.spec = spec
        self.nproc = spec.nproc
        self.control = ControlServer(wake)
        self._hello: Dict[int, int] = {}     # local rank -> pid
        self._ready: set = set()
        self._running: Dict[int, int] = {}   # local rank -> round it runs in
        self._progress: Dict[int, float] = {}  # local rank -> last sign of progress (running)
        self._clock = time.time

    @property
    def env(self) -> Dict[str, str]:
        return {AGENT_ADDR: self.control.addr}

    def reset(self) -> None:
        """The workers were stopped: forget them and whatever they still had to say."""
        self.control.forget()
        self._hello.clear()
        self._ready.clear()
        self._running.clear()
        self._progress.clear()

    def drain(self, pids: Sequence[int]) -> List[Tuple[int, Message]]:
        """Messages from the current workers (by pid), with the bookkeeping applied."""
        current = set(pids)
        out = []
        while not self.control.messages.empty():
            local_rank, pid, msg = self.control.messages.get_nowait()
            if pid not in current:
                continue  # a stopped worker's last words
            if isinstance(msg, Hello):
                self._hello[local_rank] = pid
            elif isinstance(msg, Ready):
                self._ready.add(local_rank)
                self._running.pop(local_rank, None)
                self._progress.pop(local_rank, None)
            elif isinstance(msg, Running):
                self._ready.discard(local_rank)
                self._running[local_rank] = msg.round
                self._progress[local_rank] = self._clock()
            elif isinstance(msg, Progress) and local_rank in self._progress:
                self._progress[local_rank] = self._clock()
            out.append((local_rank, msg))
        return out

    def stalled(self, timeout: float) -> List[Tuple[int, float]]:
        """(local rank, seconds idle) of running workers with no progress for `timeout`; each is
        reported once (it is killed and replaced, so its clock is dropped)."""
        now = self._clock()
        out = [(k, now - t) for k, t in self._progress.items() if now - t > timeout]
        for local_rank, _ in out:
            del self._progress[local_rank]
        return out

    def capable(self, pids: Sequence[int]) -> bool:
        """All of this node's workers use the in-place API and are alive."""
        return len(pids) == self.nproc and sorted(self._hello.values()) == sorted(pids)

    def all_ready(self) -> bool:
        return len(self._ready) == self.nproc

    def all_running(self, number: int) -> bool:
        return len(self._running) == self.nproc and set(self._running.values()) == {number}

    def push_round(self, a: WorldAssignment) -> None:
        for local_rank in range(self.nproc):
            world = worker_world(self.spec, a, local_rank)
            self.control.send(local_rank, RoundMessage(a.round, member=True, world=world))

    def push_standby(self, number: int) -> None:
        for local_rank in range(self.nproc):
            self.control.send(local_rank, RoundMessage(number, member=False))

    def push_leave(self, checkpoint: bool) -> None:
        """The node leaves: finish at the next step boundary; `checkpoint` when no node remains
        to carry the state, so it must go to disk."""
        for local_rank in range(self.nproc):
            self.control.send(local_rank, Leave(checkpoint))

    def close(self) -> None:
        self.control.close()
