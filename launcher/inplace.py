"""The agent's bookkeeping for in-place workers: who said hello, who is ready or running where,
when each last made progress (for hang detection), and the round messages they are sent (over
launcher.control)."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence, Tuple

from .control import ControlServer
from .workers import WorldAssignment

ENV_AGENT_ADDR = "ELASTIC_AGENT_ADDR"


class InPlaceWorkers:
    def __init__(self, nproc: int, wake: Callable[[], None]):
        self.nproc = nproc
        self.control = ControlServer(wake)
        self._hello: Dict[int, int] = {}     # local rank -> pid
        self._ready: set = set()
        self._running: Dict[int, int] = {}   # local rank -> round it runs in
        self._progress: Dict[int, float] = {}  # local rank -> last sign of progress (running)
        self._clock = time.time

    @property
    def env(self) -> Dict[str, str]:
        return {ENV_AGENT_ADDR: self.control.addr}

    def reset(self) -> None:
        """The workers were stopped: forget them and whatever they still had to say."""
        self.control.forget()
        self._hello.clear()
        self._ready.clear()
        self._running.clear()
        self._progress.clear()

    def drain(self, pids: Sequence[int]) -> List[Tuple[int, dict]]:
        """Messages from the current workers (by pid), with the bookkeeping applied."""
        current = set(pids)
        out = []
        while not self.control.messages.empty():
            local_rank, pid, msg = self.control.messages.get_nowait()
            if pid not in current:
                continue  # a stopped worker's last words
            kind = msg.get("type")
            if kind == "hello":
                self._hello[local_rank] = pid
            elif kind == "ready":
                self._ready.add(local_rank)
                self._running.pop(local_rank, None)
                self._progress.pop(local_rank, None)
            elif kind == "running":
                self._ready.discard(local_rank)
                self._running[local_rank] = int(msg["round"])
                self._progress[local_rank] = self._clock()
            elif kind == "progress" and local_rank in self._progress:
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
            self.control.send(local_rank, {
                "type": "round", "round": a.round, "member": True,
                "rank": a.rank_offset + local_rank, "local_rank": local_rank,
                "world_size": a.world_size, "local_world_size": self.nproc,
                "group_rank": a.group_rank, "group_world_size": a.group_world_size,
                "master_addr": a.master_addr, "master_port": a.master_port,
                "restart_count": a.restart_count, "env": dict(a.env),
            })

    def push_standby(self, number: int) -> None:
        for local_rank in range(self.nproc):
            self.control.send(local_rank, {"type": "round", "round": number, "member": False})

    def push_leave(self, checkpoint: bool) -> None:
        """The node leaves: finish at the next step boundary; `checkpoint` when no node remains
        to carry the state, so it must go to disk."""
        for local_rank in range(self.nproc):
            self.control.send(local_rank, {"type": "leave", "checkpoint": checkpoint})

    def close(self) -> None:
        self.control.close()
