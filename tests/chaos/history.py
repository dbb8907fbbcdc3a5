"""The audit of what the job trained: its surviving history against what the sampler prescribes.

fixed_train.py records, for every step a rank trains, the round and the indices it took;
`surviving_steps` keeps for each step the records of the last round that trained it (earlier
attempts were rolled back). Under the fixed batch policy the global batch never changes, so step
s of epoch e is step k = s - 1 - e * steps_per_epoch of that epoch, and rank r of a world of W
must have taken the r-th share (the plan's split) of perm_e[k*G : (k+1)*G]. `ElasticSampler`
and `FixedBatch` give exactly that share; each record is compared with it.

A surviving step may lack the record of a rank: one SIGKILLed after the step's gradient
all-reduce (which needs every rank's share) and before it wrote its record. The ranks that did
record the step applied a gradient holding that share, so it was trained: it is counted as
unrecorded, not lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from elastic.policy import FixedBatch
from elastic.sampler import ElasticSampler


class Prescription:
    """The indices the sampler gives each rank at each step, for one dataset and batch policy."""

    def __init__(self, dataset: int, global_batch: int, max_micro_batch: int, seed: int):
        self.dataset, self.seed = dataset, seed
        self.policy = FixedBatch(global_batch, max_micro_batch)
        self.global_batch = global_batch
        self._samplers: Dict[int, ElasticSampler] = {}

    def share(self, epoch: int, k: int, world: int, rank: int) -> List[int]:
        sampler = self._samplers.get(world)
        if sampler is None:
            sampler = self._samplers[world] = ElasticSampler(
                self.dataset, self.global_batch, rank=0, world_size=world, seed=self.seed)
            sampler.set_plan(self.policy.plan(world), 0)
        sampler.set_epoch(epoch)
        return sampler.step_indices(k, rank=rank)


@dataclass
class Audit:
    problems: List[str] = field(default_factory=list)
    lost: int = 0          # samples of an epoch that no surviving step trained
    duplicated: int = 0    # samples trained more than once within an epoch
    unrecorded: int = 0    # shares trained by a rank killed before it wrote its record


def round_worlds(events: Sequence[dict]) -> Dict[int, int]:
    """Round number -> its world size, from the event log."""
    return {e["round"]: e["world_size"] for e in events if e["event"] in ("rendezvous", "rescale")}


def audit(final: Dict[int, list], worlds: Dict[int, int], epochs: int, steps_per_epoch: int,
          prescription: Prescription) -> Audit:
    result = Audit()
    trained: Dict[int, List[int]] = {e: [] for e in range(epochs)}
    for step in range(1, epochs * steps_per_epoch + 1):
        records = final.get(step)
        if not records:
            result.problems.append(f"step {step} is in no surviving record")
            continue
        epoch, k = divmod(step - 1, steps_per_epoch)
        rnd = records[0]["round"]
        world = worlds.get(rnd)
        if world is None:
            result.problems.append(f"round {rnd} (step {step}) is not in the event log")
            continue
        by_rank = {r["rank"]: r for r in records}
        for rank in range(world):
            share = prescription.share(epoch, k, world, rank)
            trained[epoch] += share
            rec = by_rank.pop(rank, None)
            if rec is None:
                result.unrecorded += len(share)
            elif rec["epoch"] != epoch or rec["indices"] != share:
                result.problems.append(
                    f"step {step} rank {rank} of round {rnd} (world {world}) trained epoch "
                    f"{rec['epoch']} indices {rec['indices']}, the sampler's share is epoch "
                    f"{epoch} indices {share}")
        if by_rank:
            result.problems.append(f"step {step}: ranks {sorted(by_rank)} are not in round "
                                   f"{rnd}'s world of {world}")
    for epoch, indices in trained.items():
        seen = set(indices)
        result.lost += len(set(range(prescription.dataset)) - seen)
        result.duplicated += len(indices) - len(seen)
    return result
