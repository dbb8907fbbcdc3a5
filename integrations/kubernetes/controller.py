"""The scaling controller: keeps as many worker pods as the job wants.

    python -m integrations.kubernetes controller --job NAME --rdzv-endpoint HOST:PORT \
        --template pod.yaml [--initial N] [--namespace NS] [--interval 2] [--once]

Rules (`reconcile` decides them, purely; the loop only reads and applies):
- The controller owns the worker count and the job's desired size is its input: change the size
  with the job client (`python -m elastic.job resize JOB N`, `release JOB NODE`), never with
  `kubectl scale`, an HPA or by deleting pods, or the controller and they fight.
- Until the job exists (its first agent creates it in etcd) it keeps `--initial` pods; a job
  whose spec has no desired size (the job then aims for its max) gets `--initial`, clamped to
  min..max, written as its desired size, so that `elastic.job status` tells the truth. Without
  --initial an unknown job is an error and an unset size means the max.
- The JOB chooses who leaves. A release, or a resize down (the leader leaves nodes out; they stay
  as spares), makes the chosen agents leave at a step boundary and exit 0. The controller never
  deletes a running worker pod to shrink: when more pods live than the job wants, it deletes
  pods that never started (Pending, not registered), newest first, then releases spares the job
  left out (newest first) through the job client; a released agent exits 0.
- Live pods: Pending, Running or Unknown ones that are not being deleted and whose node was not
  released. A pod just created that has not registered as a job node yet counts: replacements
  follow the count, never a single pod.
- Exited pods are deleted: Succeeded (exit 0: the job let it go; since a release lowered the
  desired size, nothing replaces it) and Failed (replaced, as the count falls short; an evicted
  pod likewise). Pods being deleted and pods of released nodes are leaving: neither live nor
  touched. New pods get `<job>-worker-<n>` with the lowest n no existing pod has, so a create
  that a stale view repeats meets the first one's name (409) instead of doubling up.
- Pods that keep failing before their agent joins (a broken template or command line) are
  replaced after a growing pause (`failure_pause`), as the kubelet backs off a crashing
  container; the streak ends when a pod made since joins the job.
- While a stop is requested nothing is created or deleted; once the job has ended (its outcome
  is written) neither, the pods keep their logs, and the controller exits 0.
- Agents must not run with --stay-as-spare: a released spare would stay, and be released again.

Kubernetes or etcd out of reach: the pass is skipped with one warning per distinct problem, and
the pods stay as they are. Exit codes: 0; 2 for bad input (arguments, the template, no
Kubernetes configuration, an unknown job without --initial); 1 when --once could not read.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .discovery import (JOB_LABEL, POD_NODE_LABEL, ROLE_LABEL, USAGE_ERROR, WORKER_ROLE,
                        default_namespace, describe_api_error, node_pods, node_pods_json,
                        phase_of, pod_order, worker_selector)

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
ETCD_TIMEOUT_S = 5.0
FAILURE_PAUSE_S, FAILURE_PAUSE_MAX_S = 5.0, 300.0
UNREACHABLE = 1
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_TEMPLATE_METADATA_DROPPED = ("name", "generateName", "namespace", "uid", "resourceVersion",
                              "creationTimestamp", "deletionTimestamp", "ownerReferences")


@dataclass(frozen=True)
class Plan:
    """What one pass does: pods to create and delete, nodes (ids) to release; each name's
    reason. done: the job has ended and the controller stops."""

    create: Tuple[str, ...] = ()
    delete: Tuple[str, ...] = ()
    release: Tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)
    live: int = 0
    failed: Tuple[str, ...] = ()  # the deleted pods that had failed
    done: bool = False


def pod_name(job: str, index: int) -> str:
    return f"{job}-worker-{index}"


def desired_size(spec: Optional[Any], initial: Optional[int]) -> Tuple[Optional[int],
                                                                      Optional[int]]:
    """(pods to keep, a desired size to write into the job or None) for the job's JobSpec, or
    None before the job exists."""
    if spec is None:
        return initial, None
    if spec.desired is not None or initial is None:
        return spec.target, None
    size = min(max(initial, spec.min_nodes), spec.max_nodes)
    return size, size


def _exit_detail(pod: Any) -> str:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        done = status.state.terminated if status.state else None
        if done is not None:
            return f"container {status.name} exited {done.exit_code}" + (
                f" ({done.reason})" if done.reason else "")
    return (pod.status.reason or "no exit code reported") if pod.status else "no status"


def reconcile(desired: Optional[int], ended: bool, pods: Sequence[Any], nodes: Sequence[Any],
              *, job: str) -> Plan:
    """The pass for the job's worker pods (V1Pod) and nodes (NodeStatus); desired None: the
    size is not known now (create and shrink nothing)."""
    by_pod = {n.labels.get(POD_NODE_LABEL): n for n in nodes if n.labels.get(POD_NODE_LABEL)}
    live: List[Any] = []
    delete: List[str] = []
    failed: List[str] = []
    reasons: Dict[str, str] = {}
    for pod in sorted(pods, key=pod_order):
        name, phase = pod.metadata.name, phase_of(pod)
        node = by_pod.get(name)
        if phase == "Succeeded":
            delete.append(name)
            reasons[name] = "exited 0: its agent left the job"
        elif phase == "Failed":
            delete.append(name)
            failed.append(name)
            reasons[name] = f"failed: {_exit_detail(pod)}"
        elif phase != "Terminating" and (node is None or node.state != "released"):
            live.append(pod)
    if ended:
        return Plan(live=len(live), done=True, reasons={job: "the job has ended"})
    create: List[str] = []
    release: List[str] = []
    if desired is not None and desired > len(live):
        taken = {p.metadata.name for p in pods}
        index = 0
        while len(create) < desired - len(live):
            if pod_name(job, index) not in taken:
                create.append(pod_name(job, index))
                reasons[create[-1]] = f"the job wants {desired} workers, {len(live)} live"
            index += 1
    elif desired is not None and desired < len(live):
        surplus = len(live) - desired
        why = f"the job wants {desired} workers, {len(live)} live"
        for pod in reversed(live):
            name = pod.metadata.name
            if surplus and phase_of(pod) == "Pending" and name not in by_pod:
                delete.append(name)
                reasons[name] = f"{why}; it has not started"
                surplus -= 1
        live_names = {p.metadata.name for p in live}
        active = any(n.state == "active" for n in nodes)  # else "spare" may be a member
        spares = [n for n in nodes if n.state == "spare" and active
                  and n.labels.get(POD_NODE_LABEL) in live_names]
        for node in sorted(spares, key=lambda n: (-n.joined_at, n.node_id))[:surplus]:
            release.append(node.node_id)
            reasons[node.node_id] = (f"{why}; pod {node.labels[POD_NODE_LABEL]} runs a spare "
                                     "the job left out")
    return Plan(create=tuple(create), delete=tuple(delete), release=tuple(release),
                reasons=reasons, live=len(live), failed=tuple(failed))


# -- the pod template ----------------------------------------------------------------------------
class TemplateError(ValueError):
    """A pod template the controller cannot use; the message says what to change."""


def check_names(job: str) -> None:
    """Raises TemplateError when `<job>-worker-<n>` cannot name a pod (a DNS label, which is a
    valid label value too)."""
    if not _DNS_LABEL.fullmatch(job) or len(pod_name(job, 99999)) > 63:
        raise TemplateError(f"job {job!r} cannot name pods ({pod_name(job, 0)}) nor label them: "
                            "use lowercase letters, digits and '-', at most 50 characters")


def load_template(path: str) -> Dict[str, Any]:
    """The v1 Pod in a YAML (or JSON) file, checked.

    Raises:
        TemplateError: unreadable, not a Pod, no containers, or a restartPolicy other than Never
            (a restarted agent would come back after the job released it).
    """
    import yaml

    try:
        with open(path) as f:
            pod = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TemplateError(f"pod template {path} cannot be read: {first}") from None
    if not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod" \
            or pod.get("apiVersion", "v1") != "v1":
        raise TemplateError(f"pod template {path} is not a v1 Pod (kind: Pod, apiVersion: v1)")
    spec = pod.get("spec")
    if not isinstance(spec, dict) or not spec.get("containers"):
        raise TemplateError(f"pod template {path} has no spec.containers")
    if spec.get("restartPolicy", "Never") != "Never":
        raise TemplateError(f"pod template {path}: restartPolicy {spec['restartPolicy']} would "
                            "start an agent again after the job released it; use Never")
    return pod


def worker_pod(template: Mapping[str, Any], name: str, namespace: str, job: str) -> Dict:
    """A copy of the template named `name` in `namespace`, labelled as the job's worker."""
    pod = copy.deepcopy(dict(template))
    pod.update(apiVersion="v1", kind="Pod")
    pod.pop("status", None)
    meta = {k: v for k, v in (pod.get("metadata") or {}).items()
            if k not in _TEMPLATE_METADATA_DROPPED}
    meta.update(name=name, namespace=namespace,
                labels={**(meta.get("labels") or {}), JOB_LABEL: job, ROLE_LABEL: WORKER_ROLE})
    pod["metadata"] = meta
    pod["spec"] = {**pod["spec"], "restartPolicy": "Never"}
    return pod


# -- the loop ------------------------------------------------------------------------------------
class UnknownJob(Exception):
    pass


class Controller:
    """Reads pods (Kubernetes) and the job (etcd), asks `reconcile`, applies the plan.

    core: a CoreV1Api; jobs: a callable returning a connected JobClient (called again after
    etcd could not be reached); warn: gets each distinct problem once, until it is solved.
    Pods that keep failing before their agent joins (a broken template, a job whose settings
    the agents' command line contradicts) are replaced after a growing pause, as the kubelet
    backs off a crashing container: `failure_pause(streak)`."""

    def __init__(self, core: Any, jobs: Callable[[], Any], job: str, namespace: str,
                 template: Mapping[str, Any], initial: Optional[int] = None,
                 warn: Callable[[str], None] = log.warning,
                 clock: Callable[[], float] = time.monotonic):
        self.core, self.job, self.namespace = core, job, namespace
        self.template, self.initial = template, initial
        self._jobs, self._client = jobs, None
        self._warn, self._problems = warn, {}
        self._clock = clock
        self._seen_job = False
        self._streak, self._hold_until, self._fresh = 0, 0.0, set()
        self.view: List[Any] = []  # the last pass's node_pods rows

    def _report(self, where: str, problem: Optional[str]) -> None:
        last = self._problems.get(where)
        self._problems[where] = problem
        if problem is not None and problem != last:
            self._warn(problem)
        elif problem is None and last is not None:
            log.info("%s: fine again", where)

    def _status(self):
        """(JobStatus or None, whether etcd answered)."""
        from rendezvous.api import RendezvousConnectionError
        from rendezvous.client import UnknownJobError

        try:
            if self._client is None:
                self._client = self._jobs()
            status = self._client.status(self.job, probe=False, recent=0)
        except UnknownJobError as exc:
            self._report("etcd", None)
            if self.initial is None and not self._seen_job:
                raise UnknownJob(f"{exc}; start its first agents, or pass --initial N to let "
                                 "the controller start N worker pods") from None
            if self._seen_job:
                self._report("job", f"job {self.job!r} is gone from etcd; its pods are left "
                                    "as they are")
            return None, True
        except RendezvousConnectionError as exc:
            self._report("etcd", f"{exc}; the pods are left as they are until etcd answers")
            self._client = None
            return None, False
        self._report("etcd", None)
        self._report("job", None)
        self._seen_job = True
        return status, True

    def tick(self) -> Optional[Plan]:
        """One pass; None when Kubernetes or etcd could not be read (warned once).

        Raises:
            UnknownJob: no such job in etcd and no --initial to start it.
        """
        try:  # pods first: a pod that exited because the job ended is seen with the outcome
            pods = self.core.list_namespaced_pod(
                self.namespace, label_selector=worker_selector(self.job)).items
        except Exception as exc:  # the API server's answer or the network's failure
            self._report("the API server", f"cannot list the worker pods in namespace "
                         f"{self.namespace} ({describe_api_error(exc)}); trying again")
            return None
        self._report("the API server", None)
        status, answered = self._status()
        if not answered:
            return None
        nodes = status.nodes if status is not None else ()
        if status is None:
            desired = None if self._seen_job else self.initial
        elif status.stop_requested and status.outcome is None:
            # Stopping: agents exit as they finish; their pods keep their logs.
            desired = None
            pods = [p for p in pods if phase_of(p) not in ("Succeeded", "Failed")]
        else:
            desired, write = desired_size(status.spec, self.initial)
            if write is not None and status.outcome is None:
                self._set_desired(write)
        plan = self._paced(reconcile(desired, status is not None and status.outcome is not None,
                                     pods, nodes, job=self.job), nodes)
        view = node_pods(nodes, pods)
        if view != self.view:
            log.info("job %s: %d live of %s wanted; %s", self.job, plan.live,
                     "?" if desired is None else desired, _view_line(view))
        self.view = view
        self._apply(plan)
        return plan

    def _paced(self, plan: Plan, nodes: Sequence[Any]) -> Plan:
        if any(n.labels.get(POD_NODE_LABEL) in self._fresh for n in nodes):
            self._streak, self._hold_until = 0, 0.0  # a pod made since the failures joined
        now = self._clock()
        if plan.failed:
            self._streak += len(plan.failed)
            self._hold_until = now + failure_pause(self._streak)
            self._fresh = set()
        if plan.create and now < self._hold_until:
            self._report("pace", f"{self._streak} worker pods failed before their agent joined "
                         f"the job; the next is created in {self._hold_until - now:.0f} s")
            return replace(plan, create=())
        self._report("pace", None)
        self._fresh.update(plan.create)
        return plan

    def _set_desired(self, size: int) -> None:
        from rendezvous.api import RendezvousError

        try:
            spec = self._client.resize(self.job, size)
            log.info("job %s had no desired size: set to %d (--initial)", self.job, spec.target)
        except RendezvousError as exc:
            self._report("resize", f"cannot set job {self.job}'s desired size to {size}: {exc}")

    def _apply(self, plan: Plan) -> None:
        from kubernetes.client.exceptions import ApiException

        from rendezvous.api import RendezvousError
        from rendezvous.client import UnknownNodeError

        for name in plan.delete:
            try:
                self.core.delete_namespaced_pod(name, self.namespace)
                log.info("deleted pod %s: %s", name, plan.reasons[name])
            except ApiException as exc:
                if exc.status != 404:  # 404: gone already
                    self._report(f"delete {name}", f"cannot delete pod {name} "
                                 f"({describe_api_error(exc)}); trying again")
        for node_id in plan.release:
            try:
                self._client.release(self.job, [node_id], reason=plan.reasons[node_id])
                log.info("released node %s: %s", node_id, plan.reasons[node_id])
            except UnknownNodeError:
                pass  # it left meanwhile
            except RendezvousError as exc:
                self._report("release", f"cannot release node {node_id}: {exc}")
        for name in plan.create:
            body = worker_pod(self.template, name, self.namespace, self.job)
            try:
                self.core.create_namespaced_pod(self.namespace, body)
                log.info("created pod %s: %s", name, plan.reasons[name])
                self._report("create", None)
            except ApiException as exc:
                if exc.status != 409:  # 409: made by an earlier pass whose view lagged
                    self._report("create", f"cannot create pod {name} "
                                 f"({describe_api_error(exc)}: {_api_message(exc)}); check "
                                 "the template and the controller's RBAC")

    def run(self, stop: threading.Event, interval: float = DEFAULT_INTERVAL_S) -> int:
        """Pass after pass until the job ends or `stop` is set; 0.

        Raises:
            UnknownJob: as tick.
        """
        started = False
        while not stop.is_set():
            plan = self.tick()
            if not started:  # after the first pass, so that an unknown job is all it says
                log.info("job %s: worker pods in namespace %s, one pass every %g s", self.job,
                         self.namespace, interval)
                started = True
            if plan is not None and plan.done:
                log.info("job %s has ended: no more pods are created; the controller stops",
                         self.job)
                return 0
            stop.wait(interval)
        return 0

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def failure_pause(streak: int) -> float:
    """Seconds before replacing the streak-th pod in a row that failed before its agent
    joined: none for the first, then 5 s doubling up to FAILURE_PAUSE_MAX_S."""
    if streak <= 1:
        return 0.0
    return min(FAILURE_PAUSE_S * 2 ** (streak - 2), FAILURE_PAUSE_MAX_S)


def _api_message(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message", "")[:300]
    except (TypeError, ValueError, AttributeError):
        return ""


def _view_line(rows) -> str:
    return ", ".join(f"{r.pod or '(no pod)'} {r.phase} node={r.node_id or '-'} {r.state}"
                     for r in rows) or "no pods"


# -- the command line ----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise TemplateError(f"{message}; run `{self.prog} --help` for the usage")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m integrations.kubernetes controller",
                description="Keep as many worker pods as the job wants (its desired size in "
                            "etcd); the job chooses who leaves.")
    p.add_argument("--job", required=True, help="the job's id (the agents' --rdzv-id)")
    p.add_argument("--rdzv-endpoint", required=True, help="the job's etcd, HOST:PORT")
    p.add_argument("--template", required=True, help="a v1 Pod (YAML) each worker is made from")
    p.add_argument("--initial", type=int, default=None,
                   help="worker pods to start the job with: created while the job does not "
                        "exist yet, and its desired size until someone resizes it")
    p.add_argument("--namespace", default=None,
                   help="default: the pod's own, else the kubeconfig context's")
    p.add_argument("--kubeconfig", default=None,
                   help="default: in-cluster, else $KUBECONFIG or ~/.kube/config")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S,
                   help=f"seconds between passes (default {DEFAULT_INTERVAL_S:g})")
    p.add_argument("--once", action="store_true",
                   help="one pass, then print the job's pods and exit")
    p.add_argument("--json", action="store_true", help="--once: print JSON")
    p.add_argument("--cacert", default=None, help="CA certificate of a TLS etcd")
    p.add_argument("--cert", default=None, help="client certificate for a TLS etcd")
    p.add_argument("--key", default=None, help="client key for a TLS etcd")
    p.add_argument("--user", default=None,
                   help="etcd user (the password is read from $ELASTIC_ETCD_PASSWORD)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from rendezvous.client import JobClient
    from rendezvous.connect import EtcdSecurity, format_endpoint, parse_endpoint

    from .api import KubernetesConfigError, connect

    try:
        args = build_parser().parse_args(argv)
        endpoint = format_endpoint(*parse_endpoint(args.rdzv_endpoint))
        security = EtcdSecurity.from_settings(ca_cert=args.cacert, cert=args.cert, key=args.key,
                                              user=args.user)
        if args.initial is not None and args.initial < 1:
            raise TemplateError(f"--initial {args.initial}: give at least 1 worker pod")
        if args.interval <= 0:
            raise TemplateError(f"--interval {args.interval:g}: give a positive number")
        check_names(args.job)
        template = load_template(args.template)
        api_client = connect(args.kubeconfig)
    except (TemplateError, ValueError, KubernetesConfigError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    from kubernetes import client

    logging.basicConfig(level=logging.INFO, format="%(asctime)s controller %(message)s")
    namespace = args.namespace or default_namespace(args.kubeconfig)
    ctl = Controller(client.CoreV1Api(api_client),
                     lambda: JobClient(endpoint, timeout=ETCD_TIMEOUT_S, security=security),
                     args.job, namespace,
                     template, initial=args.initial)
    try:
        if args.once:
            plan = ctl.tick()
            if plan is None:
                return UNREACHABLE
            _print_once(ctl, plan, args.json)
            return 0
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        return ctl.run(stop, args.interval)
    except UnknownJob as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        ctl.close()
        api_client.close()


def _print_once(ctl: Controller, plan: Plan, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"job": ctl.job, "live": plan.live, "ended": plan.done,
                          "created": list(plan.create), "deleted": list(plan.delete),
                          "released": list(plan.release), "reasons": dict(plan.reasons),
                          "pods": node_pods_json(ctl.view)}, indent=2))
        return
    rows = [["POD", "PHASE", "K8S NODE", "JOB NODE", "STATE"]]
    rows += [[r.pod or "-", r.phase, r.k8s_node, r.node_id or "-", r.state] for r in ctl.view]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
