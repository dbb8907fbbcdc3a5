"""The elastic sampler: which sample indices each rank trains on, exactly once per epoch.

It owns one seeded permutation per epoch, a committed cursor into it and the rule that maps an
optimizer step to indices. The global batch of a step is always taken from the *remaining* part
of the permutation, so after a change of world size, global batch or a rollback, whatever is left
of the epoch is re-partitioned over the new world with no bookkeeping:

    step k after the cursor:  global batch = perm[cursor + k*G : cursor + (k+1)*G]
    rank r takes              global batch[offset_r : offset_r + rank_batch_r]

where offset_r is the sum of the rank batches of ranks before r (ranks take consecutive slices
in rank order, as `elastic.policy.BatchPlan` describes them).

Two positions: `position` (in flight, moved by `advance()` once per finished optimizer step) and
`cursor` (committed, moved to `position` by `commit()`; `rollback()` moves `position` back).
Iterating does not move either: a DataLoader with worker processes pulls batches from its batch
sampler ahead of the training loop (prefetch), so the sampler cannot know from iteration alone
which steps were really trained. A training loop therefore reads:

    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate_or_none)
    for epoch in range(state.epoch, epochs):
        sampler.set_epoch(epoch)          # same epoch as the sampler's: keeps the cursor (resume)
        for batch in loader:              # one item = this rank's whole share of one optimizer step
            ...forward/backward/step; weight the loss by sampler.step_global_batch() (see below)...
            sampler.advance()
            state.step += 1
            if state.step % 10 == 0:
                state.commit()            # ElasticState.commit() calls sampler.commit()
        state.epoch = epoch + 1

After `rollback()`, `set_world()`, `set_epoch()` to another epoch or `load_state_dict()`, start a
new iteration (`iter(loader)`): a running iterator stops at its next item.

Empty shares: with drop_last=False the last global batch of an epoch may be smaller than G. It is
split by the same slices, clipped to its length, so the last ranks can get an empty list. Such a
rank must still run the step and join every collective (contributing zero gradient and zero
samples); default_collate cannot collate nothing, hence `collate_or_none`, which gives None for
an empty share. Average gradients over `step_global_batch()`, the true number of samples in the
step, not over a fixed batch size, so the short step is weighted correctly.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler
from torch.utils.data.dataloader import default_collate

STATE_KEYS = ("epoch", "cursor", "seed", "dataset_len", "global_batch", "shuffle", "drop_last")


def even_split(global_batch: int, world_size: int) -> list[int]:
    """Per-rank batches as even as possible; the first ranks take the remainder."""
    base, extra = divmod(global_batch, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def collate_or_none(batch: list, collate_fn: Callable[[list], Any] = default_collate) -> Any:
    """Collate a rank's share, or None for an empty share (see the module docstring)."""
    return None if len(batch) == 0 else collate_fn(batch)


class ElasticSampler(Sampler[list[int]]):
    """Batch sampler (`DataLoader(batch_sampler=...)`): yields this rank's indices per step."""

    def __init__(self, dataset_len: int, global_batch: int, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        self.dataset_len = dataset_len
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._epoch = 0
        self._cursor = 0
        self._position = 0
        self._perm = self._permutation(0)
        # Bumped by everything that invalidates what a running iterator would yield.
        self._generation = 0
        # The environment is the launcher's contract (torchrun variables); read only as defaults.
        self.set_world(int(os.environ.get("RANK", 0)) if rank is None else rank,
                       int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size,
                       global_batch)

    # -- the world ---------------------------------------------------------------------------

    def set_world(self, rank: int, world_size: int, global_batch: Optional[int] = None,
                  rank_batches: Optional[Sequence[int]] = None) -> None:
        """Set this rank's place in the world and the per-rank split of the global batch.

        `rank_batches[r]` is the number of samples rank r takes per step (for a BatchPlan:
        `[plan.rank_batch(r) for r in range(world_size)]`); it must sum to the global batch.
        The default splits the global batch evenly, which needs at least one sample per rank.

        Raises:
            ValueError: a bad rank, world size, global batch or split.
        """
        global_batch = self.global_batch if global_batch is None else global_batch
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if rank_batches is None:
            if global_batch < world_size:
                raise ValueError(
                    f"global batch {global_batch} is smaller than the world size {world_size}: "
                    "some ranks would never get a sample; raise the global batch or pass "
                    "rank_batches explicitly")
            rank_batches = even_split(global_batch, world_size)
        rank_batches = [int(b) for b in rank_batches]
        if len(rank_batches) != world_size or any(b < 0 for b in rank_batches):
            raise ValueError(f"rank_batches {rank_batches} must be {world_size} counts >= 0")
        if sum(rank_batches) != global_batch:
            raise ValueError(f"rank_batches {rank_batches} sum to {sum(rank_batches)}, "
                             f"not to the global batch {global_batch}")
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        self.rank_batches = rank_batches
        self._offsets = [sum(rank_batches[:r]) for r in range(world_size)]
        self._generation += 1

    def set_plan(self, plan: Any, rank: int) -> None:
        """set_world from an `elastic.policy.BatchPlan` (world size, global batch, rank batches)."""
        self.set_world(rank, plan.world_size, plan.global_batch,
                       [plan.rank_batch(r) for r in range(plan.world_size)])

    # -- positions ---------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def cursor(self) -> int:
        """Committed position: samples of this epoch consumed by committed steps."""
        return self._cursor

    @property
    def position(self) -> int:
        """In-flight position: samples of this epoch consumed by advanced steps."""
        return self._position

    @property
    def remaining(self) -> int:
        """Samples of this epoch after the in-flight position."""
        return self.dataset_len - self._position

    def __len__(self) -> int:
        """Steps left in the epoch from the in-flight position."""
        if self.drop_last:
            return self.remaining // self.global_batch
        return -(-self.remaining // self.global_batch)

    def advance(self) -> None:
        """Mark one optimizer step (one global batch) as trained: moves the in-flight position."""
        if len(self) == 0:
            raise RuntimeError(f"epoch {self._epoch} has no step left to advance over "
                               f"(position {self._position} of {self.dataset_len}); "
                               "call set_epoch() for the next epoch")
        self._position = min(self._position + self.global_batch, self.dataset_len)

    def commit(self) -> None:
        """Make the in-flight position the committed cursor."""
        self._cursor = self._position

    def rollback(self) -> None:
        """Return the in-flight position to the committed cursor (after a failed step)."""
        self._position = self._cursor
        self._generation += 1

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at cursor 0; the current epoch is kept as it is, so a resumed loop can
        call set_epoch(state.epoch) without losing its place."""
        if epoch == self._epoch:
            return
        self._epoch, self._cursor, self._position = epoch, 0, 0
        self._perm = self._permutation(epoch)
        self._generation += 1

    # -- indices -----------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        # Seeded by seed + epoch alone, so every rank, and every restarted worker, agrees.
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_len, generator=generator)

    def _step_bounds(self, start: int, steps_ahead: int) -> tuple[int, int]:
        """(first, end) in the permutation of the global batch `steps_ahead` after `start`."""
        first = start + steps_ahead * self.global_batch
        end = min(first + self.global_batch, self.dataset_len)
        if first >= self.dataset_len or (self.drop_last and end - first < self.global_batch):
            raise IndexError(f"epoch {self._epoch} has no step {steps_ahead} after {start}")
        return first, end

    def global_indices(self, step_in_epoch_offset: int = 0) -> list[int]:
        """All ranks' indices of the step `step_in_epoch_offset` steps after the position."""
        first, end = self._step_bounds(self._position, step_in_epoch_offset)
        return self._perm[first:end].tolist()

    def step_global_batch(self, step_in_epoch_offset: int = 0) -> int:
        """Samples in that step over all ranks: G, or less for the last step of an epoch."""
        first, end = self._step_bounds(self._position, step_in_epoch_offset)
        return end - first

    def step_indices(self, step_in_epoch_offset: int = 0, rank: Optional[int] = None) -> list[int]:
        """Indices of `rank` (default: this rank) in the step `step_in_epoch_offset` steps
        after the in-flight position."""
        return self._rank_slice(self._position, step_in_epoch_offset,
                                self.rank if rank is None else rank)

    def _rank_slice(self, start: int, steps_ahead: int, rank: int) -> list[int]:
        first, end = self._step_bounds(start, steps_ahead)
        lo = min(first + self._offsets[rank], end)
        hi = min(lo + self.rank_batches[rank], end)
        return self._perm[lo:hi].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # Fixed at the start: advance() moves the position while this iterator is running.
        start, steps, generation = self._position, len(self), self._generation
        for k in range(steps):
            if self._generation != generation:
                return
            yield self._rank_slice(start, k, self.rank)

    def committed_indices(self) -> list[int]:
        """Indices of this epoch consumed by committed steps, over all ranks (for audits)."""
        return self._perm[:self._cursor].tolist()

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The committed state; the world (rank, split) belongs to the process, not the state."""
        return {"epoch": self._epoch, "cursor": self._cursor, "seed": self.seed,
                "dataset_len": self.dataset_len, "global_batch": self.global_batch,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a committed state (both positions at its cursor).

        The seed and shuffle flag define the permutation, so they are taken from the state; the
        global batch and split stay as this process's world set them (a resumed job may run a
        different batch plan), the saved global batch is informational.

        Raises:
            ValueError: the state is incomplete or belongs to a dataset of another length.
        """
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks {missing}; it was not made by ElasticSampler")
        if state["dataset_len"] != self.dataset_len:
            raise ValueError(
                f"sampler state is for a dataset of {state['dataset_len']} samples, but this "
                f"dataset has {self.dataset_len}; its cursor would point at other samples — "
                "load it with the dataset it was saved with, or start the epoch afresh")
        if not 0 <= state["cursor"] <= self.dataset_len:
            raise ValueError(f"sampler cursor {state['cursor']} is outside 0..{self.dataset_len}")
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self.drop_last = state["drop_last"]
        self._epoch = state["epoch"]
        self._cursor = self._position = state["cursor"]
        self._perm = self._permutation(self._epoch)
        self._generation += 1
