"""How many replicas an endpoint wants: a pure policy in the manner of Knative's KPA, with the
clock in its inputs (no Ray, no time of its own).

Every `observe` adds a sample (the requests in flight and queued at one instant, and optionally
the recent p95 latency); `decide` turns the samples into a replica count:

- **stable**: the average demand over the last `stable_window_s` (60 s), divided by
  `target` concurrent requests per replica, rounded up;
- **panic**: the same over the last `panic_window_s` (6 s). When that asks for `panic_threshold`
  (2x) the replicas that are ready, the endpoint panics: it scales up to the short-window count at
  once and never down while panicking; the panic ends once a whole stable window has passed
  without the condition;
- **scale-down** is bounded: at most by `max_scale_down_rate` (a halving) per decision;
- **scale to zero** (`min_replicas` 0): after `idle_s` with no request; the first request after
  that asks for one replica at once (the router holds it until the replica is ready);
- **SLO** (optional): while the p95 latency is above `slo_p95_s`, one more replica than ready;
- always within `min_replicas..max_replicas`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple


class PolicyError(ValueError):
    """A policy setting that cannot work; the message names it."""


@dataclass(frozen=True)
class PolicyConfig:
    min_replicas: int = 1
    max_replicas: int = 8
    target: float = 4.0  # concurrent requests per replica
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_down_rate: float = 2.0
    idle_s: float = 300.0  # before scale-to-zero (min_replicas 0 only)
    slo_p95_s: Optional[float] = None

    def check(self) -> None:
        if self.min_replicas < 0:
            raise PolicyError(f"min replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise PolicyError(f"max replicas ({self.max_replicas}) must be >= 1 and >= min "
                              f"({self.min_replicas})")
        if self.target <= 0:
            raise PolicyError(f"target concurrency must be > 0, got {self.target:g}")
        if not 0 < self.panic_window_s <= self.stable_window_s:
            raise PolicyError("the panic window must be > 0 and no longer than the stable one")
        if self.panic_threshold <= 1 or self.max_scale_down_rate < 1:
            raise PolicyError("panic threshold must be > 1 and max scale-down rate >= 1")
        if self.idle_s < 0 or (self.slo_p95_s is not None and self.slo_p95_s <= 0):
            raise PolicyError("idle time must be >= 0 and an SLO > 0")


@dataclass(frozen=True)
class Sample:
    time: float
    demand: float  # requests in flight and queued at the router
    p95_s: Optional[float] = None  # recent p95 latency, when known


@dataclass(frozen=True)
class PolicyState:
    samples: Tuple[Sample, ...] = ()
    panic_since: Optional[float] = None  # when the current panic began
    panic_seen: float = 0.0  # when the panic condition last held
    panic_floor: int = 0  # panicking: never below this
    last_request: Optional[float] = None  # the last time demand was above zero
    started: Optional[float] = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    state: PolicyState
    reason: str
    panic: bool = False


def observe(state: PolicyState, sample: Sample, cfg: PolicyConfig) -> PolicyState:
    """Keep the sample (and only what the stable window still needs)."""
    horizon = sample.time - cfg.stable_window_s
    samples = tuple(s for s in state.samples if s.time > horizon) + (sample,)
    last = sample.time if sample.demand > 0 else state.last_request
    started = state.started if state.started is not None else sample.time
    return replace(state, samples=samples, last_request=last, started=started)


def _average(samples, since: float) -> float:
    window = [s.demand for s in samples if s.time > since]
    return sum(window) / len(window) if window else 0.0


def _count(demand: float, target: float) -> int:
    return math.ceil(demand / target - 1e-9) if demand > 0 else 0


def decide(state: PolicyState, now: float, ready: int, cfg: PolicyConfig) -> Decision:
    """The replica count wanted now, given `ready` replicas serving."""
    stable = _count(_average(state.samples, now - cfg.stable_window_s), cfg.target)
    short = _count(_average(state.samples, now - cfg.panic_window_s), cfg.target)
    capacity = max(ready, 1)
    condition = short >= cfg.panic_threshold * capacity and short > ready
    panic_since, seen, floor = state.panic_since, state.panic_seen, state.panic_floor
    if condition:
        seen = now
        if panic_since is None:
            panic_since, floor = now, 0
    elif panic_since is not None and now - seen >= cfg.stable_window_s:
        panic_since, floor = None, 0
    latest = state.samples[-1] if state.samples else None
    active = latest is not None and latest.demand > 0
    if panic_since is not None:
        want = max(short, floor, ready)
        floor = want
        why = f"panic: {short} replica(s) for the last {cfg.panic_window_s:g} s"
    else:
        want = stable
        why = f"stable: {stable} replica(s) for the last {cfg.stable_window_s:g} s"
    if want == 0:
        idle_since = state.last_request if state.last_request is not None else state.started
        if cfg.min_replicas == 0 and not active and idle_since is not None \
                and now - idle_since >= cfg.idle_s:
            why = f"no request for {now - idle_since:.0f} s: scale to zero"
        elif active:
            want, why = 1, "a request is waiting: one replica (cold start)" if ready == 0 \
                else why
        elif ready > 0:
            want, why = 1, f"{why}; kept at one until {cfg.idle_s:g} s without a request"
    elif panic_since is None:
        bound = math.ceil(ready / cfg.max_scale_down_rate)
        if want < bound:
            want, why = bound, f"{why}; scaling down at most {cfg.max_scale_down_rate:g}x a step"
    if ready == 0 and want > 0 and active and "cold start" not in why:
        why = f"{why}; cold start: requests wait at the router for the first replica"
    if cfg.slo_p95_s is not None and active and latest.p95_s is not None \
            and latest.p95_s > cfg.slo_p95_s and want <= ready:
        want, why = ready + 1, f"p95 {latest.p95_s:.3f} s is above the SLO {cfg.slo_p95_s:g} s"
    if want > cfg.max_replicas:
        want, why = cfg.max_replicas, f"{why}; capped at max {cfg.max_replicas}"
    if want < cfg.min_replicas:
        want, why = cfg.min_replicas, f"{why}; min {cfg.min_replicas}"
    new = replace(state, panic_since=panic_since, panic_seen=seen, panic_floor=floor)
    return Decision(want, new, why, panic=panic_since is not None)


__all__ = ["PolicyConfig", "PolicyError", "PolicyState", "Sample", "Decision", "observe",
           "decide"]
