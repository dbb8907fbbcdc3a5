"""The controller: the scheduler core's decisions carried out on a real Ray cluster.

Every tick (and at once when something is submitted or stopped) it

  1. reads the inventory from Ray (live nodes, resources, labels) into the core's state;
  2. takes new submissions and stop requests from etcd (`store`);
  3. looks at its members: bundles placed, actors up, processes ended;
  4. runs `step()` and applies the result to the state (requests and releases of nodes go to
     the node provider);
  5. makes Ray match the state (`_reconcile`): members the state holds and Ray does not are
     started (a placement-group bundle pinned to the node the core chose, an actor in it, the
     member's process in the actor); members Ray holds and the state does not are taken away:
     a training member through the job client's `release` (it leaves at a step boundary; its
     bundle is freed when its agent has gone), anything else at once;
     an endpoint has no members of its own to start: Ray Serve runs its replicas, as many as
     the record grants (`serving` reads the grant and writes the count its policy asks for);
  6. writes what changed to etcd, so a restarted controller continues from there.

Actors and placement groups are detached: they outlive a controller that dies, and the next one
finds them by name. The decisions are the core's; this module only carries them out.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from rendezvous.client import JobClient, JobError

from . import endpoint_stats
from .inventory import alive_nodes, noticed_members, replica_nodes
from .members import MemberProcess
from .metrics import PoolMetrics, PoolView
from .providers import NodeProvider, NoProvider
from .scheduler import (Config, ReleaseNodes, RequestNodes, State, Step, SubmissionError, add_node,
                        apply, drain_node, finish, mark_ready, parse, rebind, remove_node, restore,
                        set_replicas, step, submit)
from .scheduler.decisions import Release
from .scheduler.model import Binding
from .scheduler.state import expire_requests
from .scheduler.workload import Member
from .spec import (ENDPOINT, GANG, MEMBER_LABEL, PLACEMENTS, TRAIN, Submission, agent_command, gang_command,
                   gang_env, job_id, member_name, worst_exit)
from .store import ENDED, FAILED, FINISHED, PENDING, RUNNING, STOPPED, PoolStore, Record

log = logging.getLogger(__name__)

NAMESPACE = "elastic-ray"
CREATING, CREATED, STARTED, LEAVING = "creating", "created", "started", "leaving"
LOG_KEPT = 4096  # of each member's output, in its record
OUTCOME_STATE = {"succeeded": FINISHED, "failed": FAILED, "stopped": STOPPED}


def load_config(text: str) -> Config:
    """The queue configuration from YAML text ('' : one queue, no limits)."""
    if not text.strip():
        return Config.default()
    import yaml
    return parse(yaml.safe_load(text))


@dataclass
class Run:
    """One member as Ray holds it."""

    workload: str
    generation: int
    member: str  # the core's member id
    node: str
    rank: int  # its place in the workload (a gang's RANK)
    pg: Any
    bundle: int
    phase: str = CREATING
    actor: Any = None
    addr_ref: Any = None
    addr: Optional[Tuple[str, int]] = None
    wait_ref: Any = None
    since: float = 0.0
    owns_pg: bool = True  # a training member's own group; a gang's members share one
    exit: Optional[int] = None

    @property
    def key(self) -> Tuple[str, int, str]:
        return self.workload, self.generation, self.member

    @property
    def name(self) -> str:
        return f"{member_name(self.member)}.{self.generation}"


@dataclass
class Controller:
    endpoint: str
    config_text: str = ""
    provider: NodeProvider = field(default_factory=NoProvider)
    namespace: str = NAMESPACE
    log_dir: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(),
                                                              "elastic-ray-logs"))
    tick_s: float = 0.5
    leave_timeout_s: float = 120.0
    security: Any = None
    clock: Any = time.time

    def __post_init__(self) -> None:
        self.config = load_config(self.config_text)
        self.store = PoolStore(self.endpoint, security=self.security)
        self.jobs = JobClient(self.endpoint, security=self.security)
        self.state = State.of(self.config, (), self.clock())
        self.subs: Dict[str, Submission] = {}
        self.records: Dict[str, Record] = {}
        self.runs: Dict[Tuple[str, int, str], Run] = {}
        self.gang_groups: Dict[Tuple[str, int], Any] = {}
        self._stopping: Dict[str, str] = {}  # training workloads asked to stop -> reason
        self._ending: Dict[str, Any] = {}  # training workloads whose job ended -> its outcome
        self._sized: Dict[str, Tuple[str, int]] = {}  # training workload -> (job, size) set
        self._agent_member: Dict[str, str] = {}  # an agent's node id -> its member's actor name
        self._packages: Dict[str, str] = {}  # workload -> its working directory's gcs:// URI
        self._observed = 0.0  # when the endpoints' replicas were last looked for
        self._replicas: Dict[str, List[str]] = {}  # endpoint -> nodes of its live replicas
        self._waiting: Dict[str, int] = {}  # endpoint -> its replicas waiting for a node
        self._written: Dict[str, str] = {}
        self._inventory: List[str] = []
        self._beat = 0.0
        self._wake = threading.Event()
        self._actor_class = None
        self.metrics = PoolMetrics(self.view, endpoint_stats.read)  # served by --metrics-port

    def view(self) -> PoolView:
        """The pool as the metrics read it (from another thread: the state is immutable, the
        records are copied)."""
        subs = dict(self.subs)
        return PoolView(self.state, dict(self.records), {n: s.kind for n, s in subs.items()},
                        {n: s.queue for n, s in subs.items()},
                        {n: len(r) for n, r in dict(self._replicas).items()}, dict(self._waiting))

    # -- the loop -------------------------------------------------------------------------
    def start(self) -> "Controller":
        """Publish the configuration and pick up what an earlier controller left."""
        import ray
        if not ray.is_initialized():
            raise RuntimeError("connect to Ray first (ray.init(address=...))")
        self._actor_class = ray.remote(MemberProcess)
        now = self.clock()
        self._sync_inventory(now)
        self.store.publish(self.config_text, list(self.state.nodes.values()), now, os.getpid())
        self._restore(now)
        self._write_records()
        return self

    def serve(self, stop: threading.Event) -> None:
        watch = self.store.watch(lambda _event: self._wake.set())
        try:
            while not stop.is_set():
                self.tick()
                self._idle(stop)
        finally:
            self.store.cancel_watch(watch)

    def _idle(self, stop: threading.Event) -> None:
        """Until the next tick, or sooner: something written under the prefix (a submission,
        a stop), or a member's actor answering (up, or its process ended)."""
        import ray
        deadline = time.monotonic() + self.tick_s
        refs = [r.addr_ref if r.phase == CREATING else r.wait_ref for r in self.runs.values()]
        refs = [r for r in refs if r is not None]
        while not stop.is_set() and not self._wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=min(left, 0.05))
                if ready:
                    break
            else:
                self._wake.wait(left)
        self._wake.clear()

    def close(self) -> None:
        self.jobs.close()
        self.store.close()

    def tick(self) -> Step:
        now = self.clock()
        self._sync_inventory(now)
        self._take_submissions(now)
        self._observe_endpoints(now)
        self._take_replicas(now)
        self._take_stops(now)
        self._poll(now)
        self._close_ended(now)
        self._drain_noticed(now)
        self.state = expire_requests(self.state, now)
        result = step(self.state, now)
        self.metrics.stepped(result)
        for d in result.decisions:
            self._note_decision(d, now)
        self.state = apply(self.state, result)
        for name, reason in result.reasons.items():
            if name in self.records and self.records[name].state == PENDING:
                self.records[name].reason = reason
        self._reconcile(now)
        self._mark_ready()
        self._write_records()
        if now - self._beat > 2.0:
            self.store.heartbeat(now, os.getpid())
            self._beat = now
        return result

    # -- what comes in ----------------------------------------------------------------------
    def _sync_inventory(self, now: float) -> None:
        import ray
        nodes = {n.name: n for n in alive_nodes(ray.nodes())}
        for name in [n for n in self.state.nodes if n not in nodes]:
            log.warning("node %s is gone", name)
            self.state = remove_node(self.state, name, now)
        for name, node in nodes.items():
            if name not in self.state.nodes:
                log.info("node %s joined the pool", name)
                self.state = add_node(self.state, node, now)
        names = sorted(nodes)
        if names != self._inventory:
            self._inventory = names
            self.store.put_inventory(list(nodes.values()))

    def _take_submissions(self, now: float) -> None:
        subs = self.store.workloads()
        for name in [n for n in self.subs if n not in subs]:  # forgotten
            self._forget(name, now)
        for name, sub in subs.items():
            if name in self.subs:
                if self.subs[name].submitted_at == sub.submitted_at:
                    continue
                self._forget(name, now)  # forgotten and submitted again between two ticks
            self.subs[name] = sub
            rec = self.records.setdefault(name, Record())
            try:
                w = sub.workload()
                if sub.kind == ENDPOINT:  # it enters the scheduler when it asks for replicas
                    rec.state, rec.reason = RUNNING, "scaled to zero"
                    rec.note(now, "endpoint registered")
                    continue
                self.state = submit(self.state, w, now)
            except SubmissionError as exc:
                self._end(name, FAILED, f"refused: {exc}", now)
                continue
            rec.reason = "queued"
            rec.note(now, f"submitted to queue {sub.queue}")

    def _take_replicas(self, now: float) -> None:
        """Each endpoint's replica count as its policy asks (its min until it asks), but never
        fewer than the replicas Serve runs or is starting, as last seen in Ray (a replica of
        Serve's cold start, which does not ask the policy; one still loading its model; one
        still draining after a scale-down): more goes to the scheduler (which frees capacity
        from lower classes if it must); fewer leaves once Serve's replicas are gone, from the
        nodes they were on; none takes it out of the scheduler."""
        asks = self.store.replicas()
        for name, sub in self.subs.items():
            rec = self.records[name]
            if sub.kind != ENDPOINT or rec.state in ENDED:
                continue
            alive = self._replicas.get(name, [])
            target = max(asks.get(name, sub.min_members), len(alive) + self._waiting.get(name, 0))
            try:
                self._ask(name, sub, rec, target, alive, now)
            except SubmissionError as exc:  # e.g. its queue is gone from a new configuration
                self._end(name, FAILED, f"refused: {exc}", now)

    def _ask(self, name: str, sub: Submission, rec: Record, target: int, alive: List[str],
             now: float) -> None:
        a, p = self.state.admitted.get(name), self.state.pending.get(name)
        held = a.workload.max_size if a else p.workload.max_size if p else 0
        if target == held:
            return
        if target == 0:
            self.state = finish(self.state, name, now)
            rec.state, rec.reason, rec.members, rec.ready = RUNNING, "scaled to zero", (), False
            rec.note(now, "scaled to zero: its capacity is back in the pool")
        elif held == 0:
            self.state = submit(self.state, sub.workload(target), now)
            rec.state, rec.reason = PENDING, "queued"
            rec.note(now, f"asks for {target} replica(s)")
        else:
            self.state = set_replicas(self.state, name, target, now, keep=alive)
            rec.note(now, f"asks for {target} replica(s)")

    def _observe_endpoints(self, now: float) -> None:
        """What Ray Serve does on its own, read from Ray's actor table (at most twice a second):
        it places replicas and picks which one goes when it scales down, so the scheduler's
        members of each endpoint follow the nodes its replicas really run on; and from zero
        replicas it starts one at the first request without asking the policy (its cold-start
        path), so a replica waiting for a node counts as an ask for one."""
        live = [n for n, sub in self.subs.items()
                if sub.kind == ENDPOINT and self.records[n].state not in ENDED]
        if not live or now - self._observed < 0.5:
            return
        self._observed = now
        from ray._private import state as ray_state  # the GCS actor table (Ray < 3)
        try:
            alive = ray_state.actors(actor_state_name="ALIVE")
            waiting = ray_state.actors(actor_state_name="PENDING_CREATION")
        except Exception as exc:
            log.warning("could not read Ray's actor table (%s)", exc)
            return
        for name in live:
            self._waiting[name] = len(replica_nodes(waiting, name, state="PENDING_CREATION"))
            nodes = self._replicas[name] = replica_nodes(alive, name)
            self.metrics.replicas_seen(name, len(nodes), self._waiting[name])
            if nodes and name in self.state.admitted:
                self.state = rebind(self.state, name, nodes, now)

    def _take_stops(self, now: float) -> None:
        for name, req in self.store.stops().items():
            self.store.clear_stop(name)
            rec, sub = self.records.get(name), self.subs.get(name)
            if rec is None or sub is None or rec.state in ENDED:
                continue
            reason = req.get("reason") or "stopped by request"
            if name in self.state.admitted and sub.kind == TRAIN and \
                    self._stop_job(job_id(sub, rec.attempt), reason):
                self._stopping[name] = reason  # the job ends as stopped; members then exit
                rec.note(now, f"stopping: {reason}")
            else:  # pending, a gang, or a training job none of whose agents has started
                self._end(name, STOPPED, reason, now)

    # -- Ray's side -------------------------------------------------------------------------
    def _poll(self, now: float) -> None:
        import ray
        refs = {}
        for run in self.runs.values():
            ref = run.addr_ref if run.phase == CREATING else run.wait_ref
            if ref is not None:
                refs[ref] = run
        if refs:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in ready:
                run = refs[ref]
                if run.key in self.runs:
                    self._advance(run, ref, now)
        for run in list(self.runs.values()):
            if run.phase == LEAVING and now - run.since > self.leave_timeout_s:
                log.warning("member %s did not leave in %.0f s; ending it", run.member,
                            self.leave_timeout_s)
                self._kill(run)
        self._start_gangs(now)

    def _advance(self, run: Run, ref, now: float) -> None:
        import ray
        if run.phase == CREATING:
            try:
                run.addr = ray.get(ref)
            except Exception as exc:  # the actor could not start (runtime_env, node gone)
                self._exited(run, 1, f"member could not start: {exc}", now)
                return
            run.phase = CREATED
            sub = self.subs[run.workload]
            if sub.kind == TRAIN:
                rec = self.records[run.workload]
                argv = agent_command(sub, self.endpoint, job_id(sub, rec.attempt), run.name)
                self._launch(run, argv, {})
        else:  # the process ended (or the actor died with its node)
            try:
                code, tail = ray.get(ref)
            except Exception:
                code, tail = -9, "(the member's actor died: its node is gone)"
            self._exited(run, code, tail, now)

    def _create_actor(self, run: Run) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        sub = self.subs[run.workload]
        opts: Dict[str, Any] = dict(
            name=run.name, namespace=self.namespace, lifetime="detached", max_concurrency=8,
            num_cpus=sub.cpus, num_gpus=sub.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                run.pg, placement_group_bundle_index=run.bundle))
        if sub.memory_mib:
            opts["memory"] = sub.memory_mib * 2**20
        if sub.working_dir:
            opts["runtime_env"] = {"working_dir": self._shipped(sub)}
        run.actor = self._actor_class.options(**opts).remote(
            run.name, os.path.join(self.log_dir, run.workload))
        run.addr_ref = run.actor.address.remote()
        run.phase = CREATING

    def _shipped(self, sub: Submission) -> str:
        """The submission's --working-dir packaged into the cluster once (a gcs:// URI): Ray
        takes a local directory only in ray.init's runtime_env, not in an actor's. Ray's own
        helper for that is private; Ray is pinned below 3 for it."""
        uri = self._packages.get(sub.name)
        if uri is None:
            from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
            env = upload_working_dir_if_needed({"working_dir": sub.working_dir},
                                               include_gitignore=True)
            uri = self._packages[sub.name] = env["working_dir"]
        return uri

    def _launch(self, run: Run, argv: List[str], env: Dict[str, str]) -> None:
        sub = self.subs[run.workload]
        run.actor.start.remote(argv, {**sub.env, **env}, None if sub.working_dir else sub.cwd)
        run.wait_ref = run.actor.wait.remote()
        run.phase = STARTED

    def _start_gangs(self, now: float) -> None:
        """A gang's members start together, once every one of them has its actor."""
        by_gang: Dict[Tuple[str, int], List[Run]] = {}
        for run in self.runs.values():
            if self.subs[run.workload].kind == GANG:
                by_gang.setdefault((run.workload, run.generation), []).append(run)
        for (name, gen), runs in by_gang.items():
            if not all(r.phase == CREATED for r in runs):
                continue
            if len(runs) != self.subs[name].max_members:
                continue
            runs.sort(key=lambda r: r.rank)
            host, port = runs[0].addr
            sub = self.subs[name]
            for r in runs:
                self._launch(r, gang_command(sub), gang_env(r.rank, len(runs), host, port,
                                                             f"{name}-{gen}"))
            self.records[name].note(now, f"started {len(runs)} members (MASTER_ADDR "
                                         f"{host}:{port})")

    def _exited(self, run: Run, code: int, tail: str, now: float) -> None:
        name, sub = run.workload, self.subs[run.workload]
        rec = self.records[name]
        rec.logs[run.member] = tail[-LOG_KEPT:]
        leaving = run.phase == LEAVING
        run.phase = "ended"
        if sub.kind == TRAIN:
            self._drop(run)
            if leaving:
                rec.note(now, f"member {run.member} left")
                return
            outcome = self._ending.get(name) or self._outcome(job_id(sub, run.generation))
            if outcome is not None:  # the job ended: its other members are leaving too
                self._ending[name] = outcome
                for other in [r for r in self.runs.values() if r.workload == name
                              and r.phase not in (STARTED, LEAVING)]:
                    self._kill(other)  # not started yet: nothing to join any more
                return  # ended by _close_ended once every member has gone
            rec.note(now, f"member {run.member} exited with code {code}; the job goes on "
                          "without it")
            a = self.state.admitted.get(name)
            if a is not None and any(m.id == run.member for m in a.members):
                self.state = apply(self.state, Step((Release(
                    name, (run.member,), a.size - 1, f"member exited ({code})"),), {}, now))
            return
        # a gang: it ends when all members have, or when one fails
        run.exit = code
        runs = [r for r in self.runs.values() if (r.workload, r.generation) == (name, run.generation)]
        if code == 0 and not all(r.exit == 0 for r in runs):
            return
        worst = worst_exit([r.exit for r in sorted(runs, key=lambda r: r.rank)])
        self._teardown_gang(name, run.generation)
        if worst == 0:
            self._end(name, FINISHED, "every member exited 0", now, exit_code=0)
        elif rec.restarts < sub.max_restarts:
            rec.restarts += 1
            rec.attempt += 1
            rec.note(now, f"member {run.member} exited with code {code}; restart "
                          f"{rec.restarts} of {sub.max_restarts}")
            rec.state, rec.members, rec.ready = PENDING, (), False
            self.state = finish(self.state, name, now)
            self.state = submit(self.state, sub.workload(), sub.submitted_at)
        else:
            self._end(name, FAILED, f"member {run.member} exited with code {code}", now,
                      exit_code=worst)

    def _close_ended(self, now: float) -> None:
        """Training workloads whose job has ended, once none of their members runs."""
        for name, outcome in list(self._ending.items()):
            if any(r.workload == name for r in self.runs.values()):
                continue
            del self._ending[name]
            state = STOPPED if name in self._stopping else OUTCOME_STATE.get(outcome.status,
                                                                             FAILED)
            self._end(name, state, self._stopping.pop(name, outcome.reason or outcome.status),
                      now, exit_code=outcome.exit_code)

    def _drain_noticed(self, now: float) -> None:
        """A spot node whose member's agent got a preemption notice: nothing new goes there
        (the agent itself leaves at a step boundary, as it does anywhere)."""
        for name in list(self.state.admitted):
            sub, rec = self.subs[name], self.records[name]
            watched = {r.name: r for r in self.runs.values() if r.workload == name
                       and r.phase == STARTED and r.node in self.state.nodes
                       and self.state.nodes[r.node].spot and r.node not in self.state.draining}
            if sub.kind != TRAIN or not watched:
                continue
            try:
                status = self.jobs.status(job_id(sub, rec.attempt), probe=False, recent=50)
            except JobError:
                continue
            # kept across ticks: an agent with a notice leaves the job (and its node list) at once
            self._agent_member.update({n.node_id: n.labels[MEMBER_LABEL] for n in status.nodes
                                       if MEMBER_LABEL in n.labels})
            for member in noticed_members(status.events, self._agent_member):
                run = watched.get(member)
                if run is not None and run.node not in self.state.draining:
                    self.state = drain_node(self.state, run.node)
                    rec.note(now, f"spot node {run.node[:12]} is draining: member {run.member}'s"
                                  " agent got a preemption notice")
                    log.info("draining spot node %s (a preemption notice)", run.node)

    def _outcome(self, job: str):
        try:
            return self.jobs.status(job, probe=False, recent=0).outcome
        except JobError:
            return None

    # -- making Ray match the state -----------------------------------------------------------
    def _reconcile(self, now: float) -> None:
        admitted = self.state.admitted
        for name, rec in self.records.items():
            sub = self.subs.get(name)
            at_zero = sub is not None and sub.kind == ENDPOINT and name not in self.state.pending
            if rec.state == RUNNING and name not in admitted and not at_zero:
                # evicted: preempted, requeued, lost
                rec.state, rec.members, rec.ready = PENDING, (), False
                rec.attempt += 1
                rec.note(now, "evicted; back in its queue")
        wanted = {(name, self.records[name].attempt, m.id)
                  for name, a in admitted.items() for m in a.members}
        for key, run in list(self.runs.items()):
            if key in wanted or run.phase in (LEAVING, "ended"):
                continue
            self._take_away(run, now)
        for gang_key in [k for k in self.gang_groups
                         if k[0] not in admitted or k[1] != self.records[k[0]].attempt]:
            self._teardown_gang(*gang_key)
        for name, a in admitted.items():
            rec, sub = self.records[name], self.subs[name]
            if rec.state != RUNNING:
                rec.state, rec.reason, rec.flavor = RUNNING, "", a.flavor
                rec.admitted_at = a.admitted_at
                rec.note(now, f"admitted with {a.size} member(s)")
            rec.members = tuple({"id": m.id, "node": m.node, "gpus": list(m.binding.gpu_indices),
                                 "joined_at": m.joined_at} for m in a.members)
            rec.next_member = a.next_member
            if sub.kind == ENDPOINT:
                continue  # Ray Serve starts its replicas once the record grants them
            if sub.kind == GANG:
                if (name, rec.attempt) not in self.gang_groups:
                    self._place_gang(name, a, rec.attempt, now)
            elif name not in self._ending and name not in self._stopping:
                new = [(i, m) for i, m in enumerate(a.members)
                       if (name, rec.attempt, m.id) not in self.runs]
                job = job_id(sub, rec.attempt)
                if new and len(new) < a.size:  # growing a running job: has it ended meanwhile?
                    outcome = self._outcome(job)
                    if outcome is not None:
                        self._ending[name] = outcome
                        continue
                for i, m in new:
                    self._place_member(name, rec.attempt, m, i, now)
                self._size_job(name, job, a.size)

    def _pin(self, node: str) -> Dict[str, str]:
        return {"ray.io/node-id": node}

    def _place_member(self, name: str, gen: int, m: Member, rank: int, now: float) -> None:
        from ray.util.placement_group import placement_group
        sub = self.subs[name]
        run = Run(name, gen, m.id, m.node, rank, None, 0, since=now)
        run.pg = placement_group([sub.bundle()], strategy="PACK", name=run.name,
                                 lifetime="detached", bundle_label_selector=[self._pin(m.node)])
        self.runs[run.key] = run
        self._create_actor(run)  # Ray starts it as soon as the bundle is placed

    def _place_gang(self, name: str, a, gen: int, now: float) -> None:
        from ray.util.placement_group import placement_group
        sub = self.subs[name]
        members = list(a.members)
        pg = placement_group([sub.bundle() for _ in members], strategy=PLACEMENTS[sub.placement],
                             name=f"{name}.{gen}", lifetime="detached",
                             bundle_label_selector=[self._pin(m.node) for m in members])
        self.gang_groups[(name, gen)] = pg
        for i, m in enumerate(members):
            run = Run(name, gen, m.id, m.node, i, pg, i, since=now, owns_pg=False)
            self.runs[run.key] = run
            self._create_actor(run)  # all start once the whole group is placed

    def _take_away(self, run: Run, now: float) -> None:
        name, sub = run.workload, self.subs[run.workload]
        current = name in self.state.admitted and run.generation == self.records[name].attempt
        if sub.kind == TRAIN and run.phase == STARTED:
            job = job_id(sub, run.generation)
            if current and self._release(job, run):
                run.phase, run.since = LEAVING, now
                self.records[name].note(now, f"releasing member {run.member} (it leaves at a "
                                             "step boundary)")
                return
            if not current:
                self._stop_job(job, "preempted by the pool's scheduler")
                run.phase, run.since = LEAVING, now
                return
        self._kill(run)

    def _size_job(self, name: str, job: str, size: int) -> None:
        """The job's desired size follows the members the core gave it (a release lowered it;
        growing raises it again, so new members join instead of waiting as spares)."""
        if self._sized.get(name) == (job, size):
            return
        try:
            if self.jobs.status(job, probe=False, recent=0).spec.target != size:
                self.jobs.resize(job, size)
            self._sized[name] = (job, size)
        except JobError:  # not created yet (its first agent creates it), or ending
            pass

    def _release(self, job: str, run: Run) -> bool:
        try:
            status = self.jobs.status(job, probe=False, recent=0)
            node = next((n.node_id for n in status.nodes
                         if n.labels.get(MEMBER_LABEL) == run.name), None)
            if node is None:
                return False
            self.jobs.release(job, [node], reason="the pool's scheduler needs the node")
            return True
        except JobError as exc:
            log.warning("could not release %s from job %s (%s); ending it", run.member, job, exc)
            return False

    def _stop_job(self, job: str, reason: str) -> bool:
        """Ask the job to commit, checkpoint and end; False if there is no job (yet) to ask."""
        try:
            self.jobs.stop(job, reason=reason)
            return True
        except JobError:
            return False

    def _kill(self, run: Run) -> None:
        import ray
        if run.actor is not None:
            try:
                ray.kill(run.actor)
            except Exception:
                pass
        self._drop(run)

    def _drop(self, run: Run) -> None:
        from ray.util.placement_group import remove_placement_group
        self.runs.pop(run.key, None)
        if run.owns_pg and run.pg is not None:
            try:
                remove_placement_group(run.pg)
            except Exception:
                pass

    def _teardown_gang(self, name: str, gen: int) -> None:
        from ray.util.placement_group import remove_placement_group
        for run in [r for r in self.runs.values() if (r.workload, r.generation) == (name, gen)]:
            self._kill(run)
        pg = self.gang_groups.pop((name, gen), None)
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:
                pass

    def _mark_ready(self) -> None:
        for name, a in self.state.admitted.items():
            if a.ready:
                continue
            gen = self.records[name].attempt
            if self.subs[name].kind == ENDPOINT or all(self.runs.get((name, gen, m.id)) is not None and
                   self.runs[(name, gen, m.id)].phase == STARTED for m in a.members):
                self.state = mark_ready(self.state, name)
                self.records[name].ready = True

    # -- decisions and endings ---------------------------------------------------------------
    def _note_decision(self, d, now: float) -> None:
        if isinstance(d, RequestNodes):
            self.provider.request(self.config.node_types[d.node_type], d.count)
            log.info("requested %d node(s) of type %s: %s", d.count, d.node_type, d.reason)
        elif isinstance(d, ReleaseNodes):
            self.provider.release(d.nodes)
            log.info("released idle node(s) %s: %s", ", ".join(d.nodes), d.reason)
        elif getattr(d, "workload", None) in self.records:
            self.records[d.workload].note(now, f"{type(d).__name__.lower()}: {d.reason}")

    def _end(self, name: str, state: str, reason: str, now: float,
             exit_code: Optional[int] = None) -> None:
        rec = self.records.setdefault(name, Record())
        sub = self.subs.get(name)
        if sub is not None and sub.kind == GANG:
            self._teardown_gang(name, rec.attempt)
        for run in [r for r in self.runs.values() if r.workload == name]:
            self._kill(run)
        rec.state, rec.reason, rec.exit_code, rec.ended_at = state, reason, exit_code, now
        rec.ready = False
        rec.note(now, f"{state}: {reason}")
        if name in self.state.admitted or name in self.state.pending:
            self.state = finish(self.state, name, now)
        log.info("workload %s %s: %s", name, state, reason)

    def _write_records(self) -> None:
        for name, rec in self.records.items():
            text = rec.to_json()
            if self._written.get(name) != text:
                self.store.put_record(name, rec)
                self._written[name] = text

    # -- a restarted controller ----------------------------------------------------------------
    def _restore(self, now: float) -> None:
        import ray
        from ray.util.placement_group import get_placement_group
        records = self.store.records()
        for name, sub in sorted(self.store.workloads().items(), key=lambda kv: kv[1].submitted_at):
            rec = records.get(name) or Record()
            self.subs[name], self.records[name] = sub, rec
            self._written[name] = rec.to_json()
            if rec.state in ENDED:
                continue
            if sub.kind == ENDPOINT:
                self._restore_endpoint(name, sub, rec, now)
                continue
            w = sub.workload()
            found: Dict[str, Any] = {}
            for m in rec.members:
                run_name = f"{member_name(m['id'])}.{rec.attempt}"
                try:
                    actor = ray.get_actor(run_name, namespace=self.namespace)
                    started, code = ray.get(actor.status.remote(), timeout=10)
                    if started and code is None and m["node"] in self.state.nodes:
                        found[m["id"]] = actor
                    else:
                        ray.kill(actor)
                except Exception:
                    pass
            alive = [m for m in rec.members if m["id"] in found]
            complete = len(alive) == len(rec.members) and alive
            if rec.state == RUNNING and (complete or (sub.kind == TRAIN and alive)):
                members = tuple(Member(m["id"], Binding(m["node"], tuple(m["gpus"])),
                                       m["joined_at"]) for m in alive)
                try:
                    self.state = restore(self.state, w, rec.flavor, members, now,
                                         sub.submitted_at, rec.next_member, rec.ready)
                except SubmissionError as exc:
                    self._end(name, FAILED, f"refused after a restart: {exc}", now)
                    continue
                gang_pg = get_placement_group(f"{name}.{rec.attempt}") \
                    if sub.kind == GANG else None
                if gang_pg is not None:
                    self.gang_groups[(name, rec.attempt)] = gang_pg
                for i, m in enumerate(rec.members):
                    if m["id"] not in found:
                        continue
                    run_name = f"{member_name(m['id'])}.{rec.attempt}"
                    pg = gang_pg or get_placement_group(run_name)
                    run = Run(name, rec.attempt, m["id"], m["node"], i, pg,
                              i if gang_pg else 0, phase=STARTED, actor=found[m["id"]],
                              since=now, owns_pg=gang_pg is None)
                    run.wait_ref = run.actor.wait.remote()
                    self.runs[run.key] = run
                rec.note(now, f"controller restarted: {len(alive)} member(s) found running")
                continue
            for actor in found.values():  # a gang that lost members starts again
                ray.kill(actor)
            if rec.state == RUNNING:
                rec.attempt += 1
                rec.note(now, "controller restarted: members were lost; back in its queue")
            rec.state, rec.members, rec.ready = PENDING, (), False
            try:
                self.state = submit(self.state, w, sub.submitted_at)
            except SubmissionError as exc:
                self._end(name, FAILED, f"refused after a restart: {exc}", now)

    def _forget(self, name: str, now: float) -> None:
        """A workload whose records were deleted (`forget`, `serving delete`): nothing of it is
        kept, so a new one may take the name."""
        if name in self.state.admitted or name in self.state.pending:
            self.state = finish(self.state, name, now)
        for run in [r for r in self.runs.values() if r.workload == name]:
            self._kill(run)
        for kept in (self.subs, self.records, self._written, self._replicas, self._waiting,
                     self._sized, self._packages, self._stopping, self._ending):
            kept.pop(name, None)

    def _restore_endpoint(self, name: str, sub: Submission, rec: Record, now: float) -> None:
        """An endpoint has no actors of its own: its grant is what the record says (Serve kept
        its replicas running meanwhile); a pending one asks again at the next tick."""
        if rec.state != RUNNING:
            rec.state = PENDING
            return
        if not rec.members:
            return
        members = tuple(Member(m["id"], Binding(m["node"], tuple(m["gpus"])), m["joined_at"])
                        for m in rec.members if m["node"] in self.state.nodes)
        try:
            self.state = restore(self.state, sub.workload(len(members)), rec.flavor, members, now,
                                 sub.submitted_at, rec.next_member, True)
        except SubmissionError as exc:
            self._end(name, FAILED, f"refused after a restart: {exc}", now)

    # -- used by tests and the benchmark -------------------------------------------------------
    def runs_of(self, name: str) -> List[Run]:
        return sorted((r for r in self.runs.values() if r.workload == name), key=lambda r: r.rank)

