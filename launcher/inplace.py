"""In-place torch workers (`integrations.torch`): a backend whose workers follow a new round in
their processes. The agent keeps track of who said hello, who waits in standby or runs in which
round, and when each last made progress (for hang detection), and sends them rounds over the
local control channel (launcher.control) in the messages of elastic.contract.

Workers that never say hello (a script that does not use the API) are restarted like those of
`ProcessBackend`; restart-mode and in-place workers meet in the same process group.
"""
from __future__ import annotations

import signal
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Tuple

from elastic.contract import (AGENT_ADDR, Hello, Leave, Message, Progress, Ready, RoundMessage,
                              Running)

from .backend import (PREWARM_ALWAYS, PREWARM_IF_JOB_IN_PLACE, BackendTraits, ProcessBackend,
                      WorkerStatus)
from .control import ControlServer
from .workers import WorkerSpec, WorldAssignment, worker_world


class InPlaceBackend(ProcessBackend):
    """forced: --rescale-mode in-place (every node pre-warms); otherwise auto (nodes pre-warm once
    the job's workers used the API, and a scale-up waits a little for starting workers)."""

    def __init__(self, spec: WorkerSpec, wake: Callable[[], None], *, forced: bool = False,
                 hint: Callable[[], Optional[str]] = lambda: None):
        self.control = ControlServer(wake)
        super().__init__(replace(spec, extra_env={**spec.extra_env,
                                                  AGENT_ADDR: self.control.addr}), hint)
        self.nproc = spec.nproc
        self.traits = BackendTraits(
            in_place=True, standby_after_world=True, holds_for_hello=not forced,
            prewarm=PREWARM_ALWAYS if forced else PREWARM_IF_JOB_IN_PLACE, reports_progress=True)
        self._hello: Dict[int, int] = {}     # local rank -> pid
        self._ready: set = set()
        self._running: Dict[int, int] = {}   # local rank -> round it runs in
        self._progress: Dict[int, float] = {}  # local rank -> last sign of progress (running)
        self._clock = time.time

    def stop(self, sig: int = signal.SIGTERM, grace: Optional[float] = None) -> None:
        super().stop(sig, grace)
        # The workers were stopped: forget them and whatever they still had to say.
        self.control.forget()
        self._hello.clear()
        self._ready.clear()
        self._running.clear()
        self._progress.clear()

    def drain(self) -> List[Tuple[int, Message]]:
        """Messages from the current workers (by pid), with the bookkeeping applied."""
        current = set(self.group.pids)
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

    def status(self) -> WorkerStatus:
        base = super().status()
        if base.state == "none":
            return base
        pids = base.pids
        capable = (base.state == "running" and len(pids) == self.nproc
                   and sorted(self._hello.values()) == sorted(pids))
        rounds = set(self._running.values())
        running_round = (next(iter(rounds)) if len(self._running) == self.nproc
                         and len(rounds) == 1 else None)
        return replace(base, capable=capable, all_ready=len(self._ready) == self.nproc,
                       running_round=running_round,
                       last_progress=tuple(sorted(self._progress.items())))

    def push_round(self, a: WorldAssignment) -> None:
        for local_rank in range(self.nproc):
            world = worker_world(self.spec, a, local_rank)
            self.control.send(local_rank, RoundMessage(a.round, member=True, world=world))
        self.group.set_ranks(a.rank_offset)  # their output is labelled with their new ranks

    def push_standby(self, number: int) -> None:
        for local_rank in range(self.nproc):
            self.control.send(local_rank, RoundMessage(number, member=False))

    def push_leave(self, checkpoint: bool) -> None:
        """The node leaves: finish at the next step boundary; `checkpoint` when no node remains
        to carry the state, so it must go to disk."""
        for local_rank in range(self.nproc):
            self.control.send(local_rank, Leave(checkpoint))

    def close(self) -> None:
        super().close()
        self.control.close()
