"""The victim rule: which members of an elastic job leave first when it shrinks.

One rule for every caller (the rendezvous leader shrinking a round to a resize, the cluster
scheduler choosing members to release): the member holding rank 0 never leaves (the callers leave
it out of `candidates`: its state is the one the others sync from), spot capacity leaves before
on-demand capacity (it may be taken away anyway), and the newest member leaves first (it has the
least warm state and the others keep their ranks). Ties fall to `key` (the larger leaves first) so the choice is repeatable.
"""
from __future__ import annotations

from typing import Callable, Iterable, Tuple, TypeVar

T = TypeVar("T")


def leavers(candidates: Iterable[T], count: int, *, spot: Callable[[T], bool],
            joined_at: Callable[[T], float], key: Callable[[T], str]) -> Tuple[T, ...]:
    """The first `count` of `candidates` in leaving order (spot first, newest first)."""
    newest_first = sorted(candidates, key=lambda c: (joined_at(c), key(c)), reverse=True)
    ordered = sorted(newest_first, key=lambda c: not spot(c))  # stable: spot first
    return tuple(ordered[:max(count, 0)])
