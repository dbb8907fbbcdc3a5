"""Which worker pods are live, and which pod each job node runs in.

`live_hosts(pods)` is what `python -m integrations.kubernetes discover` prints, for horovodrun's
`--host-discovery-script`: one `HOST:SLOTS` line per live host, where a pod is live when it is
Running, not being deleted, has an IP and (when the pod reports conditions) is Ready. HOST is the
pod's IP; SLOTS is --slots, else the pod's annotation `elastic.run/slots`, else 1; pods sharing
an IP (hostNetwork) add their slots up, as integrations/horovod/discover.py does for agents.
Hosts come oldest pod first, so the order stays put while pods come and go.

    #!/bin/sh
    exec python -m integrations.kubernetes discover --job my-job --slots 8

`node_pods(nodes, pods)` maps a job's nodes (the job client's NodeStatus, whose `pod` label the
agent was started with: `--node-label pod=$(POD_NAME)`) to their pods, for the controller's view.

Exit codes: 0; 1 with one line on stderr when the API server cannot be read (horovodrun asks
again); 2 for bad arguments or no Kubernetes configuration.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

JOB_LABEL = "elastic.run/job"
ROLE_LABEL = "elastic.run/role"
WORKER_ROLE = "worker"
SLOTS_ANNOTATION = "elastic.run/slots"
POD_NODE_LABEL = "pod"  # the agent's --node-label naming its pod
USAGE_ERROR, UNREACHABLE = 2, 1
_EPOCH = datetime.fromtimestamp(0, timezone.utc)


def worker_selector(job: str) -> str:
    """The label selector of a job's worker pods."""
    return f"{JOB_LABEL}={job},{ROLE_LABEL}={WORKER_ROLE}"


def pod_order(pod: Any) -> Tuple[datetime, Tuple]:
    """Oldest first, then by name with its numbers read as numbers (w-2 before w-10)."""
    meta = pod.metadata
    created = meta.creation_timestamp or _EPOCH
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    name = meta.name or ""
    return created, tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                          for part in re.split(r"(\d+)", name) if part)


def is_live(pod: Any) -> bool:
    """Running, not being deleted, with an IP, and Ready when it reports conditions."""
    status = pod.status
    if pod.metadata.deletion_timestamp is not None or status is None:
        return False
    if status.phase != "Running" or not status.pod_ip:
        return False
    conditions = status.conditions or []
    return not conditions or any(c.type == "Ready" and c.status == "True" for c in conditions)


def annotated_slots(pod: Any) -> Optional[int]:
    """The pod's `elastic.run/slots` annotation as a positive count; None when absent.

    Raises:
        ValueError: the annotation is there but is not a positive whole number.
    """
    text = (pod.metadata.annotations or {}).get(SLOTS_ANNOTATION)
    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"pod {pod.metadata.name}: annotation {SLOTS_ANNOTATION}={text!r} is "
                         "not a positive whole number; 1 slot is assumed")
    return int(text)


def pod_slots(pod: Any, slots: Optional[int] = None) -> int:
    if slots is not None:
        return slots
    try:
        return annotated_slots(pod) or 1
    except ValueError:
        return 1


def live_hosts(pods: Iterable[Any], slots: Optional[int] = None) -> List[Tuple[str, int]]:
    """(host, slots) of the live pods, hosts in the order of their oldest pod."""
    found: Dict[str, int] = {}
    for pod in sorted((p for p in pods if is_live(p)), key=pod_order):
        host = pod.status.pod_ip
        found[host] = found.get(host, 0) + pod_slots(pod, slots)
    return list(found.items())


@dataclass(frozen=True)
class NodePod:
    """One row of a job's pod view: a job node and its pod, or a pod no node names (yet)."""

    pod: Optional[str]        # the pod's name; None: the node names no pod that exists
    node_id: Optional[str]    # the job node in the pod; None: not registered (yet, or any more)
    state: str                # the node's state (active, spare, released) or "-"
    phase: str                # the pod's phase, "Terminating" while deleted, or "-"
    k8s_node: str             # the Kubernetes node the pod is scheduled on, or "-"


def phase_of(pod: Any) -> str:
    if pod.metadata.deletion_timestamp is not None:
        return "Terminating"
    return (pod.status.phase if pod.status is not None else None) or "Pending"


def node_pods(nodes: Sequence[Any], pods: Iterable[Any]) -> List[NodePod]:
    """The job's nodes with their pods (by the node's `pod` label), then the pods of the job
    that no node names, in pod order."""
    by_name = {p.metadata.name: p for p in pods}
    rows, claimed = [], set()
    for node in nodes:
        name = (node.labels or {}).get(POD_NODE_LABEL)
        pod = by_name.get(name) if name else None
        if pod is not None:
            claimed.add(name)
        rows.append(NodePod(pod=name if pod is not None else None, node_id=node.node_id,
                            state=node.state, phase=phase_of(pod) if pod is not None else "-",
                            k8s_node=(pod.spec.node_name if pod is not None and pod.spec
                                      else None) or "-"))
    for pod in sorted((p for n, p in by_name.items() if n not in claimed), key=pod_order):
        rows.append(NodePod(pod=pod.metadata.name, node_id=None, state="-", phase=phase_of(pod),
                            k8s_node=(pod.spec.node_name if pod.spec else None) or "-"))
    return rows


def node_pods_json(rows: Sequence[NodePod]) -> List[dict]:
    return [asdict(r) for r in rows]


# -- the command line ----------------------------------------------------------------------------
class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(f"{message}; run `{self.prog} --help` for the usage")


def default_namespace(kubeconfig: Optional[str]) -> str:
    """$POD_NAMESPACE or the service account's namespace in a pod, else the kubeconfig
    context's namespace, else "default" (as kubectl)."""
    import os

    from .api import ENV_POD_NAMESPACE, SERVICE_ACCOUNT_NAMESPACE, own_pod

    if os.environ.get(ENV_POD_NAMESPACE) or os.path.exists(SERVICE_ACCOUNT_NAMESPACE):
        return own_pod(name="-").namespace
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # no or a broken kubeconfig: connect() says so with its own message
        return "default"


def list_pods(api_client: Any, namespace: str, selector: str) -> List[Any]:
    from kubernetes import client

    return client.CoreV1Api(api_client).list_namespaced_pod(
        namespace, label_selector=selector).items


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(prog="python -m integrations.kubernetes discover",
                     description="Print the live worker pods as HOST:SLOTS lines (horovodrun "
                                 "--host-discovery-script format), oldest first.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--selector", help="the pods' label selector, e.g. app=train")
    which.add_argument("--job", help=f"a job's worker pods ({worker_selector('JOB')})")
    parser.add_argument("--namespace", default=None,
                        help="default: the pod's own, else the kubeconfig context's")
    parser.add_argument("--slots", type=int, default=None,
                        help=f"slots per pod (default: its {SLOTS_ANNOTATION} annotation, else 1)")
    parser.add_argument("--kubeconfig", default=None,
                        help="default: in-cluster, else $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--json", action="store_true", help="a JSON list of hosts")
    try:
        args = parser.parse_args(argv)
        if args.slots is not None and args.slots < 1:
            raise _Usage(f"--slots {args.slots}: give a positive number of slots per pod")
    except _Usage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR

    from .api import KubernetesConfigError, connect

    try:
        api_client = connect(args.kubeconfig)
    except (KubernetesConfigError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    namespace = args.namespace or default_namespace(args.kubeconfig)
    selector = args.selector or worker_selector(args.job)
    try:
        pods = list_pods(api_client, namespace, selector)
    except Exception as exc:  # the API server's or the network's: horovodrun asks again
        print(f"error: cannot list pods {selector!r} in namespace {namespace} "
              f"({describe_api_error(exc)})", file=sys.stderr)
        return UNREACHABLE
    finally:
        api_client.close()
    if args.slots is None:
        for pod in pods:
            try:
                annotated_slots(pod)
            except ValueError as exc:
                print(f"warning: {exc}", file=sys.stderr)
    hosts = live_hosts(pods, args.slots)
    if args.json:
        print(json.dumps([{"host": h, "slots": s} for h, s in hosts]))
    else:
        for host, count in hosts:
            print(f"{host}:{count}")
    return 0


def describe_api_error(exc: BaseException) -> str:
    """One line for an API server's answer or a network failure."""
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".rstrip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


if __name__ == "__main__":
    sys.exit(main())
