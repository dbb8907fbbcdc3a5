"""The discrete-event replay behind benchmarks/pollux.py: a trace's jobs go through the scheduler's
own `submit` / `step` / `apply` / `finish` (integrations/ray/scheduler), and each running job
advances by its throughput at its current number of members.

Events: a job's arrival, a job's completion, and a tick every `interval` seconds (Pollux's
scheduling interval) while jobs are in the system; at each, `step` runs once, after that moment's
arrivals and completions. Admitted workloads are marked ready at once (members start without
delay); a job whose size changes (its admission included) makes no progress for `rescale_s`
seconds while it holds its new members (the artifact charges 30 s per re-allocation).

Policies:
  ours      every job Workload.elastic(min, max, throughput=...) in the default queue
            (BestEffortFIFO, no quota);
  rigid     every job Workload.gang(the trace's GPUs) in one StrictFIFO queue;
  rigid-bf  the same gangs in the default BestEffortFIFO queue (backfill around a reservation).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

# pollux_trace first: it puts the repository on the path
from pollux_trace import CLUSTER_GPUS, GPUS_PER_NODE, MEMBER, Job, cluster

from integrations.ray.scheduler import (Config, State, Workload, apply, finish,  # noqa: E402
                                        mark_ready, parse, step, submit)

ELASTIC, RIGID, BACKFILL = "ours", "rigid", "rigid-bf"
POLICIES = (ELASTIC, RIGID, BACKFILL)
RIGID_CONFIG = {"clusterQueues": [{"name": "default", "queueingStrategy": "StrictFIFO",
                                   "flavors": [{"name": "default"}]}]}
DONE = 1e-9  # a job with less than this share of its work left has finished (float drift)


def workload(job: Job, policy: str, elastic_min: int = 1) -> Workload:
    if policy == ELASTIC:
        return Workload.elastic(job.name, min(elastic_min, job.max_gpus), job.max_gpus, MEMBER,
                                throughput=job.speeds)
    return Workload.gang(job.name, job.gpus, MEMBER)


def config(policy: str) -> Config:
    return parse(RIGID_CONFIG) if policy == RIGID else Config.default()


@dataclass
class Run:
    """One job's life in the replay."""

    job: Job
    size: int = 0  # GPUs held now
    done: float = 0.0  # samples
    paused_until: float = 0.0
    admitted_at: Optional[float] = None  # first admission
    ended_at: Optional[float] = None
    resizes: int = 0  # size changes after the first admission
    gpu_seconds: float = 0.0
    spread_seconds: float = 0.0  # GPU-seconds on more nodes than ceil(size / 4)
    layout: Tuple[int, ...] = ()  # its GPUs on each node it uses, most first

    @property
    def speed(self) -> float:
        return self.job.speeds[self.size - 1] if self.size else 0.0

    @property
    def spread(self) -> bool:
        return len(self.layout) > math.ceil(self.size / GPUS_PER_NODE)

    def finish_time(self, now: float) -> float:
        return max(now, self.paused_until) + (self.job.work - self.done) / self.speed

    def advance(self, t0: float, t1: float) -> None:
        if not self.size:
            return
        self.done += self.speed * max(0.0, t1 - max(t0, self.paused_until))
        self.gpu_seconds += self.size * (t1 - t0)
        if self.spread:
            self.spread_seconds += self.size * (t1 - t0)


@dataclass
class Replay:
    runs: List[Run]
    steps: int = 0
    step_seconds: float = 0.0  # wall time spent in step()
    decisions: Dict[str, int] = field(default_factory=dict)  # decision type -> count


def simulate(jobs: List[Job], policy: str, interval: float = 60.0, rescale_s: float = 30.0,
             elastic_min: int = 1) -> Replay:
    state = State.of(config(policy), cluster(), now=0.0)
    runs = {j.name: Run(j) for j in jobs}
    out = Replay(list(runs.values()))
    arrivals = sorted(jobs, key=lambda j: (j.submit, j.name))
    nxt = 0  # the next arrival
    present: Dict[str, Run] = {}  # submitted and not ended
    now, tick = 0.0, interval
    while nxt < len(arrivals) or present:
        times = [r.finish_time(now) for r in present.values() if r.size]
        if nxt < len(arrivals):
            times.append(arrivals[nxt].submit)
        if present:
            times.append(tick)
        later = min(times)
        for r in present.values():
            r.advance(now, later)
        now = later
        if now >= tick:
            tick = (math.floor(now / interval) + 1) * interval
        for name in [n for n, r in present.items()
                     if r.size and r.job.work - r.done <= DONE * r.job.work]:
            r = present.pop(name)
            r.ended_at, r.size, r.layout = now, 0, ()
            state = finish(state, name, now)
        while nxt < len(arrivals) and arrivals[nxt].submit <= now:
            j = arrivals[nxt]
            state = submit(state, workload(j, policy, elastic_min), now)
            present[j.name] = runs[j.name]
            nxt += 1
        started = time.perf_counter()
        result = step(state, now)
        out.step_seconds += time.perf_counter() - started
        out.steps += 1
        for d in result.decisions:
            out.decisions[type(d).__name__] = out.decisions.get(type(d).__name__, 0) + 1
        state = apply(state, result)
        for name, a in state.admitted.items():
            if not a.ready:
                state = mark_ready(state, name)
        for name, r in present.items():
            a = state.admitted.get(name)
            members = a.members if a is not None else ()
            if len(members) != r.size:
                if r.admitted_at is None:
                    r.admitted_at = now
                elif members:
                    r.resizes += 1
                r.size, r.paused_until = len(members), now + rescale_s
            per_node: Dict[str, int] = {}
            for m in members:
                per_node[m.node] = per_node.get(m.node, 0) + 1
            r.layout = tuple(sorted(per_node.values(), reverse=True))
    return out


def summarize(replay: Replay) -> Dict[str, object]:
    """avg/p50/p99 JCT, makespan (first submission to last completion), average queueing delay
    (submission to first admission), GPU utilisation (allocated GPU-seconds / (GPUs x makespan)),
    resizes per job, the share of GPU-seconds on spread placements, and the step's cost."""
    runs = replay.runs
    jct = np.array([r.ended_at - r.job.submit for r in runs])
    queued = np.array([r.admitted_at - r.job.submit for r in runs])
    makespan = max(r.ended_at for r in runs) - min(r.job.submit for r in runs)
    gpu_s = sum(r.gpu_seconds for r in runs)
    return {"avg_jct": float(jct.mean()), "p50_jct": float(np.percentile(jct, 50)),
            "p99_jct": float(np.percentile(jct, 99)), "makespan": makespan,
            "avg_queue": float(queued.mean()), "util": gpu_s / (CLUSTER_GPUS * makespan),
            "resizes": sum(r.resizes for r in runs) / len(runs),
            "spread": sum(r.spread_seconds for r in runs) / gpu_s if gpu_s else 0.0,
            "steps": replay.steps, "step_ms": 1000 * replay.step_seconds / max(1, replay.steps),
            "jcts": jct.tolist()}
