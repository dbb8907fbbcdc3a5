"""How the agent drives its node's workers, whatever they run: one interface, several backends.

- `ProcessBackend` (here): workers of any script, restarted on every change of world (restart
  mode). It is also the base of the others: a `WorkerGroup` of processes.
- `launcher.inplace.InPlaceBackend`: torch workers that use the in-place API follow a new round
  in their processes (a local control channel), wait in standby when pre-warmed, report progress.
- `integrations.horovod.agent.HorovodBackend`: Horovod workers, reset in place by `hvd.elastic`.

The agent never asks which backend it has: what differs is in `BackendTraits` (data the agent's
decisions read) and in what the methods do. The backend is chosen where the command line becomes
an agent (`elastic.run`).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Tuple

from elastic.contract import Message

from .workers import WorkerFailure, WorkerGroup, WorkerSpec, WorldAssignment

PREWARM_NEVER, PREWARM_IF_JOB_IN_PLACE, PREWARM_ALWAYS = "never", "if-job-in-place", "always"


@dataclass(frozen=True)
class BackendTraits:
    """What a backend's workers can do, for the agent's decisions.

    in_place: a new round can reach running workers without restarting them.
    standby_after_world: workers that were in a world can go back to standby when their node is
        left out of a round (otherwise they are stopped).
    holds_for_hello: workers not yet heard from may still reach the in-place API, so a scale-up
        that comes while they start is worth holding back a little (--rescale-mode auto).
    prewarm: when a joining node starts its workers in standby before it registers: never,
        if-job-in-place (once some node's workers used the in-place API), or always.
    reports_progress: workers report step progress (hang detection can watch them).
    """

    in_place: bool = False
    standby_after_world: bool = False
    holds_for_hello: bool = False
    prewarm: str = PREWARM_NEVER
    reports_progress: bool = False


@dataclass(frozen=True)
class WorkerStatus:
    """This node's workers at one moment.

    state: none (no workers), running, succeeded (all exited 0), failed (one exited non-zero;
        `failure` is the first). capable: every worker can take a round in place now. all_ready:
        every worker waits in standby. running_round: the round all of them run in, if one.
    last_progress: (local rank, unix time) of the latest sign of progress of each running worker
        that reports it.
    """

    state: str = "none"
    failure: Optional[WorkerFailure] = None
    pids: Tuple[int, ...] = ()
    started_at: float = 0.0
    capable: bool = False
    all_ready: bool = False
    running_round: Optional[int] = None
    last_progress: Tuple[Tuple[int, float], ...] = ()


class WorkerBackend(Protocol):
    traits: BackendTraits

    def prepare(self) -> None:
        """Before this node registers in a job that is running: be ready to start workers at
        once (the zygote's imports done), so the members it joins do not wait for them."""

    def start(self, assignment: Optional[WorldAssignment]) -> None:
        """Spawn the node's workers for a round, or in standby (None).

        Raises:
            WorkerStartError: a worker could not be started.
        """

    def stop(self, sig: int = signal.SIGTERM, grace: Optional[float] = None) -> None:
        """Stop every worker (sig, then SIGKILL after `grace`) and forget what they said."""

    def status(self) -> WorkerStatus:
        """Where the workers stand now (never blocks for long)."""

    def drain(self) -> List[Tuple[int, Message]]:
        """What the current workers said since the last call, as (local rank, message)."""

    def push_round(self, assignment: WorldAssignment) -> None:
        """In place: tell the running (or standby) workers their place in a new round."""

    def push_standby(self, number: int) -> None:
        """In place: round `number` has no place for this node; workers wait in standby."""

    def push_leave(self, checkpoint: bool) -> None:
        """In place: this node leaves; workers finish at the next step boundary."""

    def signal(self, pid: int, sig: int) -> None:
        """Send `sig` to one worker (hang detection)."""

    def failure_hint(self) -> Optional[str]:
        """Something to add to a failure report (e.g. the script is for another backend)."""

    def close(self) -> None:
        """Stop the workers and release what the backend holds (ports, scratch files)."""


class ProcessBackend:
    """Workers of any script, started for each round and stopped on the next (restart mode)."""

    traits = BackendTraits()

    def __init__(self, spec: WorkerSpec, hint: Callable[[], Optional[str]] = lambda: None):
        self.spec = spec
        self.group = WorkerGroup(spec)
        self._hint = hint

    def prepare(self) -> None:
        if self.spec.zygote is not None:
            self.spec.zygote.wait_ready()

    def start(self, assignment: Optional[WorldAssignment]) -> None:
        self.group.start(assignment)

    def stop(self, sig: int = signal.SIGTERM, grace: Optional[float] = None) -> None:
        self.group.stop(sig=sig, grace_period_s=grace)

    def status(self) -> WorkerStatus:
        if not self.group.running:
            return WorkerStatus()
        polled = self.group.poll()
        return WorkerStatus(state=polled.status, failure=polled.failure,
                            pids=tuple(self.group.pids), started_at=self.group.started_at)

    def drain(self) -> List[Tuple[int, Message]]:
        return []

    def push_round(self, assignment: WorldAssignment) -> None:
        raise RuntimeError("restart-mode workers cannot take a round in place")

    def push_standby(self, number: int) -> None:
        raise RuntimeError("restart-mode workers have no standby")

    def push_leave(self, checkpoint: bool) -> None:
        raise RuntimeError("restart-mode workers cannot leave at a step boundary")

    def signal(self, pid: int, sig: int) -> None:
        if pid in self.group.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def failure_hint(self) -> Optional[str]:
        return self._hint()

    def close(self) -> None:
        self.group.close()
