"""`run(train, state)`: keep a training function going across world changes, in process.

    def train(world):
        ddp = DDP(model)                       # rebuilt on every (re)entry
        while state.epoch < epochs:
            for indices in sampler:
                ...step...
                world.step_boundary(state)     # commits and switches when a new round is pending
            ...
    run(train, state, checkpoint="ckpt.pt")

On entry the worker joins the current world and resumes (rank 0 loads the checkpoint, everyone
syncs from rank 0). `train` is re-entered after each change: at an agreed step boundary
(WorldChanged: nothing lost), or after a collective failed because a peer died (the state rolls
back to the last commit). Surviving processes are never restarted. When this node leaves (a
preemption notice or SIGTERM to its agent), `run` raises SystemExit(0) at the next boundary,
after saving the committed state to `checkpoint` if no other node remains. Without an agent channel
(started by torchrun, or by `elastic.run --rescale-mode restart`) a failure propagates as usual
and the launcher restarts the workers.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, TypeVar

from .world import ElasticWorld, LeftJob, WorldChanged

T = TypeVar("T")


def run(train: Callable[[ElasticWorld], T], state, *, checkpoint: Optional[str] = None,
        world: Optional[ElasticWorld] = None) -> T:
    try:
        return _run(train, state, checkpoint, world)
    except Exception as exc:
        # As torch's @record: the launcher reads the exception from TORCHELASTIC_ERROR_FILE
        # (the root cause of the job's failure) instead of searching the worker's log.
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler
        get_error_handler().record_exception(exc)
        raise


def _run(train, state, checkpoint, world):
    world = world or ElasticWorld()
    world.join()
    state.plan = world.plan
    state.resume(checkpoint)
    world.note_commits(state)  # commits from here on are progress made in this process
    changed = False
    try:
        while True:
            try:
                if changed:
                    world.reconfigure()
                    state.plan = world.plan
                    state.resume(None)
                    changed = False
                result = train(world)
                world.settle()  # the last boundary's flag, still in flight on every rank
                return result
            except WorldChanged:
                changed = True
            except LeftJob:
                # Our node left (preemption notice, SIGTERM) at a boundary, committed. When no
                # node remains to hold the state, it goes to disk before the grace period ends.
                if world.channel.checkpoint_on_leave and checkpoint \
                        and os.environ.get("LOCAL_RANK", "0") == "0":
                    state.save(checkpoint)
                raise
            except RuntimeError as exc:  # gloo/NCCL errors are RuntimeErrors (DistBackendError)
                if not world.in_place:
                    raise
                world.report_failure(exc, state)
                state.restore()
                changed = True
    finally:
        world.close()
