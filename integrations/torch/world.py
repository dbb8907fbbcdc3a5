"""The worker's side of in-place rescaling: its channel to the agent and its process group.

`ElasticWorld` joins the job's current world (from the environment when the agent started this
worker for a round, or by waiting for a round when it was started in standby, pre-warmed), and
at every step boundary agrees with the other ranks whether a new round is pending (one
one-element all-reduce, launched at one boundary and read at the next, so no step waits for it:
a change takes effect one step after a rank first knows of it). When one is, every rank leaves
the old process group at the same step and `reconfigure()` builds the new one; a rank whose node is no longer a member goes back to
standby, or exits when its agent is leaving.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from elastic import checkpoint, contract, gpu
from elastic.contract import (CheckpointSaved, CollectiveFailed, Hello, Leave, Progress, Ready,
                              RoundMessage, Running, WorkerWorld)
from elastic.policy import BatchPlan

DEFAULT_PG_TIMEOUT = timedelta(seconds=60)
# Progress reports to the agent (for --hang-timeout) are sent at most this often.
PROGRESS_INTERVAL_S = 0.5
STORE_POLL_S = 0.005


def _wait_for_listener(host: str, port: int, timeout: timedelta) -> None:
    """Wait until rank 0's store listens. A pre-warmed newcomer learns of the round before the
    survivors reach their step boundary; a store client that finds no server backs off for
    hundreds of milliseconds, so knock cheaply until the server is there."""
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(STORE_POLL_S)


class WorldChanged(Exception):
    """Raised at a step boundary that every rank agreed on: the world is about to change."""


class LeftJob(SystemExit):
    """This worker's node left the job; the process ends with code 0."""

    def __init__(self):
        super().__init__(0)


class AgentChannel:
    """The messages of `elastic.contract` to and from this node's agent (launcher/control.py)."""

    def __init__(self, addr: str, local_rank: int):
        host, _, port = addr.rpartition(":")
        self._sock = socket.create_connection((host, int(port)))
        self._cond = threading.Condition()
        self._round: Optional[RoundMessage] = None
        self.leaving = False
        self.checkpoint_on_leave = False
        self._send_lock = threading.Lock()
        self.send(Hello(local_rank=local_rank, pid=os.getpid()))
        threading.Thread(target=self._read, name="agent-channel", daemon=True).start()

    @classmethod
    def from_env(cls) -> Optional["AgentChannel"]:
        addr = os.environ.get(contract.AGENT_ADDR)
        return cls(addr, int(os.environ.get(contract.LOCAL_RANK, "0"))) if addr else None

    def _read(self) -> None:
        try:
            for line in self._sock.makefile("r", encoding="utf-8"):
                msg = contract.decode(line)
                with self._cond:
                    if isinstance(msg, RoundMessage):
                        if self._round is None or msg.round >= self._round.round:
                            self._round = msg
                    elif isinstance(msg, Leave):
                        self.leaving = True
                        self.checkpoint_on_leave = msg.checkpoint
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        with self._cond:  # the agent is gone: nothing left to wait for
            self.leaving = True
            self._cond.notify_all()

    def send(self, msg: contract.Message) -> None:
        with self._send_lock:
            try:
                self._sock.sendall(contract.encode(msg))
            except OSError:
                pass  # the agent is gone; PDEATHSIG ends us shortly

    @property
    def latest_round(self) -> int:
        with self._cond:
            return self._round.round if self._round else 0

    def wait_round(self, after: int) -> Optional[RoundMessage]:
        """Block until a round newer than `after` that includes this node arrives; None if the
        node is leaving."""
        with self._cond:
            while True:
                if self.leaving:
                    return None
                r = self._round
                if r is not None and r.round > after and r.member:
                    return r
                self._cond.wait()


class ElasticWorld:
    """This worker's place in the job; see the module docstring."""

    def __init__(self, backend: str = "gloo", timeout: timedelta = DEFAULT_PG_TIMEOUT):
        self.backend, self.timeout = backend, timeout
        gpu.setup()  # this worker's share of its GPU's memory (--gpu-memory-fraction), if any
        self.channel = AgentChannel.from_env()
        self.round = 0
        self.plan: Optional[BatchPlan] = None
        self._steps, self._reported_at = 0, 0.0
        # For the agent's metrics: steps of progress (set back at a rollback), the progress at
        # the last commit seen, and the state's commit count then.
        self._progress, self._committed, self._commits = 0, 0, None
        self._flag = None  # (work, tensor): the all-reduce launched at the last boundary
        self._unsubscribe = lambda: None
        if self.channel is not None:
            # The agent asks for our stacks (SIGUSR1) before it kills us as hung.
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            channel = self.channel
            self._unsubscribe = checkpoint.on_saved(
                lambda _path, took: channel.send(CheckpointSaved(duration_s=round(took, 6))))

    @property
    def in_place(self) -> bool:
        return self.channel is not None

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def join(self) -> None:
        """Enter the current world: the agent's environment if it started us for a round,
        otherwise (standby) the first round that includes this node."""
        if contract.RANK in os.environ:
            self.round = int(os.environ.get(contract.ROUND, "0"))
            dist.init_process_group(self.backend, timeout=self.timeout)
            self.plan = BatchPlan.from_env(os.environ)
        else:
            self._enter(self._next_round())
        self._announce()

    def _next_round(self) -> WorkerWorld:
        self.channel.send(Ready())
        msg = self.channel.wait_round(self.round)
        if msg is None:
            raise LeftJob()
        return msg.world

    def _enter(self, world: WorkerWorld) -> None:
        os.environ.update(contract.world_env(world))  # user code reading env sees it
        self.round = world.round
        if world.rank != 0:
            _wait_for_listener(world.master_addr, world.master_port, self.timeout)
        dist.init_process_group(
            self.backend, init_method=f"tcp://{world.master_addr}:{world.master_port}",
            rank=world.rank, world_size=world.world_size, timeout=self.timeout)
        self.plan = BatchPlan.from_env(os.environ)

    def _announce(self) -> None:
        if self.channel is not None:
            self.channel.send(Running(round=self.round))

    def change_pending(self) -> bool:
        """Collective: True on every rank when any rank knew of a newer round (or of its node
        leaving) at the previous call. Every rank must call it at the same step. This call's
        own flag is all-reduced in the background while the next step runs (gloo's thread, or
        NCCL's stream), and read at the next call: the boundary costs no round trip."""
        if self.channel is None:
            return False
        mine = 1.0 if (self.channel.latest_round > self.round or self.channel.leaving) else 0.0
        flag = torch.tensor([mine], device=self._device())
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        previous, self._flag = self._flag, (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return previous[1].item() > 0

    def settle(self) -> None:
        """Wait for the flag still in flight (every rank launched it), before leaving the group:
        at a change, and when training returns."""
        if self._flag is not None:
            pending, self._flag = self._flag, None
            pending[0].wait()

    @staticmethod
    def _device():
        if "nccl" in str(dist.get_backend()):  # "nccl", or "cpu:gloo,cuda:nccl"
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def step_boundary(self, state) -> None:
        """Call after every optimizer step, on every rank. When a new world is pending, commit
        `state` (nothing is lost: the old world still works) and raise WorldChanged."""
        self._steps += 1
        self._progress += 1
        self.note_commits(state)
        self._report_progress()
        if self.change_pending():
            self.settle()
            state.commit()
            self.note_commits(state)
            raise WorldChanged()

    def note_commits(self, state) -> None:
        """For the agent's metrics: a commit of `state` since the last look covers the progress
        so far (scripts commit after the step and before its boundary; one committing after the
        boundary is counted a step late). The first look only notes the count."""
        commits = getattr(state, "commit_count", None)
        if commits is not None and commits != self._commits:
            if self._commits is not None:
                self._committed = self._progress
            self._commits = commits

    def _report_progress(self) -> None:
        now = time.monotonic()
        if self.channel is not None and now - self._reported_at >= PROGRESS_INTERVAL_S:
            self._reported_at = now
            self.channel.send(Progress(steps=self._steps, committed=self._committed))

    def reconfigure(self) -> None:
        """Leave the old process group and enter the next round's (after a boundary everyone
        agreed on, or after a collective failure)."""
        self._leave_group()
        self._enter(self._next_round())
        self._announce()

    def report_failure(self, exc: BaseException, state=None) -> None:
        """Tell the agent a collective failed; the caller rolls `state` back to its last
        commit, so the steps since are lost (and trained again)."""
        if state is not None:
            self.note_commits(state)
        lost, self._progress = self._progress - self._committed, self._committed
        if self.channel is not None:
            self.channel.send(CollectiveFailed(
                round=self.round, error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc))[-4000:], lost_steps=lost))

    def _leave_group(self) -> None:
        self._flag = None  # settled by now, or the group broke (a failure): dropped either way
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group may fail to shut down; it is dropped either way
                pass

    def close(self) -> None:
        self._unsubscribe()
        self._leave_group()
