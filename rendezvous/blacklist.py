"""Blacklisting: strikes against nodes whose own workers fail, and the cooldowns they earn.

Pure bookkeeping over the `BlacklistEntry` records that every Round carries, so a new leader
continues where the old one stopped. `rendezvous.decision` decides when to call these.

- A round re-formed for a worker failure gives one strike to one node: the one whose report is
  the earliest (its workers failed first; its peers' workers usually fail after it, in
  collectives).
- Every `blacklist_after` strikes cool the node down: it is left out of new rounds until
  `excluded_until`, while it stays registered and its agent keeps waiting. The k-th cooldown of a
  node lasts `blacklist_cooldown * 2**(k-1)`, capped at `blacklist_max_cooldown`; its strikes
  start again from zero. When the cooldown ends the node is admitted like a newcomer that
  arrived at that moment.
- Strikes never decay within a job. The records stay small: each strike costs one restart, so
  there are at most max_restarts + 1 of them.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Iterable, Tuple

from .api import BlacklistEntry, RendezvousSettings

Blacklist = Tuple[BlacklistEntry, ...]

# Past this many doublings any sane cap is reached; bounding the exponent keeps the float finite.
_MAX_DOUBLINGS = 60


def _entry(blacklist: Blacklist, node_id: str) -> BlacklistEntry:
    return next((e for e in blacklist if e.node_id == node_id), BlacklistEntry(node_id))


def _put(blacklist: Blacklist, entry: BlacklistEntry) -> Blacklist:
    others = [e for e in blacklist if e.node_id != entry.node_id]
    return tuple(sorted(others + [entry], key=lambda e: e.node_id))


def cooling_down(blacklist: Blacklist, now: float) -> Dict[str, float]:
    """The nodes left out of rounds at `now`, with the end of their cooldown."""
    return {e.node_id: e.excluded_until for e in blacklist if e.excluded_until > now}


def eligible_since(blacklist: Blacklist, node_id: str, first_seen: float, now: float) -> float:
    """When a node became a candidate for a round: the end of its last cooldown if that has
    passed and came after the leader first saw it, else its first sighting."""
    until = _entry(blacklist, node_id).excluded_until
    return max(first_seen, until) if until <= now else first_seen


def cooldown(exclusions: int, settings: RendezvousSettings) -> float:
    """How long a node that has served `exclusions` cooldowns is cooled down next."""
    doubled = settings.blacklist_cooldown * 2.0 ** min(exclusions, _MAX_DOUBLINGS)
    return min(doubled, settings.blacklist_max_cooldown)


def add_strike(blacklist: Blacklist, node_id: str,
               settings: RendezvousSettings) -> Tuple[Blacklist, bool]:
    """Count a worker failure against `node_id`. Returns the new records and whether the node
    has earned a cooldown. Nothing is counted when blacklisting is off."""
    if settings.blacklist_after == 0:
        return blacklist, False
    entry = _entry(blacklist, node_id)
    entry = replace(entry, strikes=entry.strikes + 1)
    return _put(blacklist, entry), entry.strikes >= settings.blacklist_after


def exclude(blacklist: Blacklist, node_id: str, now: float,
            settings: RendezvousSettings) -> Blacklist:
    """Cool the node down from `now`; its strikes start again from zero."""
    entry = _entry(blacklist, node_id)
    return _put(blacklist, replace(
        entry, strikes=0, excluded_until=now + cooldown(entry.exclusions, settings),
        exclusions=entry.exclusions + 1,
    ))


def cut_short(blacklist: Blacklist, node_ids: Iterable[str], now: float) -> Blacklist:
    """End the cooldowns of nodes admitted early (to keep the job at min nodes)."""
    for nid in node_ids:
        blacklist = _put(blacklist, replace(_entry(blacklist, nid), excluded_until=now))
    return blacklist
