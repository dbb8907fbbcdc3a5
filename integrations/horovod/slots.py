"""Horovod's view of a round: each worker's slot (ranks and sizes) and the environment it starts with.

Pure: no Horovod import, no I/O.

A slot is what Horovod's gloo controller reads from HOROVOD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE,
_CROSS_RANK and _CROSS_SIZE at `hvd.init()`, and what an elastic worker gets back from
`GET /rank_and_size/<host>:<local_rank>` when it re-initialises after a reset. Each member node of
a round is one Horovod "host" (named by its node id, so two agents on one machine are two hosts);
ranks follow the round (survivors keep their order, newcomers are appended). The cross
communicator of local rank k holds local rank k of every node that has one, in rank order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from elastic.contract import PLAN_URL as ENV_PLAN_URL


# What an agent answers to rank_and_size for a worker whose node is not in the round: Horovod's
# init then fails with "has been removed from elastic job" and the process exits.
REMOVED = "-1,-1,-1,-1,-1,-1"
# Where a worker asks its agent for the batch plan of the world it is in now (integrations.horovod.worker).
PLAN_SCOPE = "elastic_plan"


@dataclass(frozen=True)
class Slot:
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int

    def answer(self) -> str:
        """The body of a rank_and_size reply."""
        return ",".join(str(v) for v in (self.rank, self.size, self.local_rank, self.local_size,
                                        self.cross_rank, self.cross_size))

    def env(self) -> Dict[str, str]:
        return {"HOROVOD_RANK": str(self.rank), "HOROVOD_SIZE": str(self.size),
                "HOROVOD_LOCAL_RANK": str(self.local_rank),
                "HOROVOD_LOCAL_SIZE": str(self.local_size),
                "HOROVOD_CROSS_RANK": str(self.cross_rank),
                "HOROVOD_CROSS_SIZE": str(self.cross_size)}


def node_slots(member_nprocs: Sequence[int], group_rank: int) -> Tuple[Slot, ...]:
    """The slots of the workers of member `group_rank` in a round whose members run
    `member_nprocs` workers each, in rank order.

    Raises:
        ValueError: group_rank is not a member, or a member runs no worker.
    """
    if not 0 <= group_rank < len(member_nprocs):
        raise ValueError(f"group rank {group_rank} is not one of {len(member_nprocs)} members")
    if any(n < 1 for n in member_nprocs):
        raise ValueError(f"every member runs at least one worker, got {list(member_nprocs)}")
    offset, size = sum(member_nprocs[:group_rank]), sum(member_nprocs)
    nproc = member_nprocs[group_rank]
    slots = []
    for local_rank in range(nproc):
        cross = [g for g, n in enumerate(member_nprocs) if n > local_rank]
        slots.append(Slot(rank=offset + local_rank, size=size, local_rank=local_rank,
                          local_size=nproc, cross_rank=cross.index(group_rank),
                          cross_size=len(cross)))
    return tuple(slots)


def worker_env(slot: Slot, *, hostname: str, port: int, iface: Optional[str],
               plan_url: str) -> Dict[str, str]:
    """What a Horovod worker needs besides the torchrun variables: its slot, the gloo controller,
    and its agent's rendezvous endpoint (HOROVOD_ELASTIC: re-initialise through rank_and_size)."""
    env = {**slot.env(), "HOROVOD_HOSTNAME": hostname, "HOROVOD_CONTROLLER": "gloo",
           "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1",
           "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port), "HOROVOD_ELASTIC": "1",
           ENV_PLAN_URL: plan_url}
    if iface:
        env["HOROVOD_GLOO_IFACE"] = iface
    return env
