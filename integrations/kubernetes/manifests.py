"""`python -m integrations.kubernetes render`: the manifests of one elastic job, as YAML.

    python -m integrations.kubernetes render --name JOB --image IMG --nnodes MIN:MAX
        [--nproc-per-node N] [--namespace NS] [--gpus-per-node G] [--spot] [--tls]
        [--pod-group] [--kueue-queue Q] [--etcd-replicas 1|3] [--grace-period S]
        [--cpu C] [--memory M] [--initial N] [--network-policy] -- SCRIPT ARGS...

`render(spec)` is pure: a checked `ManifestSpec` in, Kubernetes objects (dicts) out:
- the job's etcd: a StatefulSet `<job>-etcd` (1 or 3 members, data on a PersistentVolumeClaim:
  a member's identity is its data directory, so a member rescheduled by a drain or a lost node
  keeps the job's records and can rejoin; an emptyDir would lose them) behind a headless Service
  of the same name; with `--tls` it serves https with the Secret `<job>-etcd-tls` (ca.crt,
  tls.crt, tls.key), which the agents also present as clients;
- the worker pod template (ConfigMap `<job>-worker-template`, key pod.yaml) and the Job
  `<job>-controller` that creates worker pods from it (integrations/kubernetes/controller.py);
- RBAC: workers get/watch their pod and node (`--preemption-k8s`); the controller manages pods;
- optional: a scheduler-plugins PodGroup (gang of MIN), Kueue's plain-pod group labels, a
  NetworkPolicy letting the job's pods reach each other, a PodDisruptionBudget for 3 members.

Workers leave on a deletion at a step boundary: the agent sees the pod's deletionTimestamp through
its watch while a preStop pause (PRESTOP_PAUSE_S) holds SIGTERM back; SIGTERM, if the watch
missed it, is a notice too, with --preemption-grace set to what is left of the grace period.
Bad input is one line on stderr and exit code 2, with nothing printed.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .discovery import (JOB_LABEL, POD_NODE_LABEL, ROLE_LABEL, SLOTS_ANNOTATION, USAGE_ERROR,
                        WORKER_ROLE)

ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.17"
CLIENT_PORT, PEER_PORT, METRICS_PORT = 2379, 2380, 2381
DEFAULT_GRACE_S = 60
PRESTOP_PAUSE_S = 5  # SIGTERM waits this long: the agent's pod watch sees the deletion first
MIN_GRACE_S = PRESTOP_PAUSE_S + 10  # the rest is the time to reach a step boundary and leave
TEMPLATE_DIR, TEMPLATE_KEY = "/etc/elastic", "pod.yaml"
CONTROLLER_RESTARTS = 1000  # the controller Job's backoffLimit: keep restarting a failed one
TLS_DIR = "/etc/etcd-tls"  # everywhere: not under /etc/elastic, the ConfigMap's read-only mount
MAX_NAME = 47  # `<job>-etcd-<10-char revision hash>` must fit a 63-character label value
POD_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"  # scheduler-plugins' coscheduling
POD_GROUP_SCHEDULER = "scheduler-plugins-scheduler"  # its name when installed by its Helm chart
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP, KUEUE_COUNT = "kueue.x-k8s.io/pod-group-name", "kueue.x-k8s.io/pod-group-total-count"
# Node labels that mark spot capacity: GKE, AKS, EKS managed node groups, Karpenter.
SPOT_NODE_LABELS = (("cloud.google.com/gke-spot", "true"),
                    ("kubernetes.azure.com/scalesetpriority", "spot"),
                    ("eks.amazonaws.com/capacityType", "SPOT"),
                    ("karpenter.sh/capacity-type", "spot"))
# Taints such nodes may carry: AKS puts this one on spot pools; GKE's is the one its docs suggest.
SPOT_TAINTS = (("kubernetes.azure.com/scalesetpriority", "spot"),
               ("cloud.google.com/gke-spot", "true"))
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


class ManifestError(ValueError):
    """Settings that cannot make a working job; the message says what to change."""


@dataclass(frozen=True)
class ManifestSpec:
    name: str
    image: str
    command: Tuple[str, ...]  # SCRIPT ARGS, as given to python -m elastic.run
    min_nodes: int
    max_nodes: int
    nproc: Optional[int] = None  # default: gpus, else 1
    namespace: str = "default"
    gpus: int = 0
    spot: bool = False
    tls: bool = False
    pod_group: bool = False
    kueue_queue: Optional[str] = None
    etcd_replicas: int = 1
    grace_period: int = DEFAULT_GRACE_S
    cpu: Optional[str] = None
    memory: Optional[str] = None
    initial: Optional[int] = None  # default: MIN with Kueue, else MAX
    network_policy: bool = False
    etcd_storage: str = "1Gi"

    def __post_init__(self) -> None:
        if not _DNS_LABEL.fullmatch(self.name) or len(self.name) > MAX_NAME:
            raise ManifestError(f"--name {self.name!r}: use lowercase letters, digits and '-' "
                                f"(starting and ending with a letter or digit), at most {MAX_NAME}")
        if not _DNS_LABEL.fullmatch(self.namespace) or len(self.namespace) > 63:
            raise ManifestError(f"--namespace {self.namespace!r} is not a namespace name: use "
                                "lowercase letters, digits and '-', at most 63")
        if not self.image or any(c.isspace() for c in self.image):
            raise ManifestError(f"--image {self.image!r}: give an image reference with the "
                                "project installed, e.g. registry.example.com/train:1.0")
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise ManifestError(f"--nnodes {self.min_nodes}:{self.max_nodes}: MIN must be at "
                                "least 1 and at most MAX")
        if self.nproc is not None and self.nproc < 1:
            raise ManifestError(f"--nproc-per-node {self.nproc}: give at least 1")
        if self.gpus < 0:
            raise ManifestError(f"--gpus-per-node {self.gpus}: give 0 or more")
        if self.etcd_replicas not in (1, 3):
            raise ManifestError(f"--etcd-replicas {self.etcd_replicas}: use 1, or 3 to survive "
                                "the loss of one member (2 would survive none)")
        if self.grace_period < MIN_GRACE_S:
            raise ManifestError(f"--grace-period {self.grace_period}: give at least {MIN_GRACE_S} "
                                f"s ({PRESTOP_PAUSE_S} s of it hold SIGTERM back while the agent "
                                "sees the deletion; the rest is for leaving at a step boundary)")
        for flag, value in (("--cpu", self.cpu), ("--memory", self.memory),
                            ("--etcd-storage", self.etcd_storage)):
            if value is not None and not _QUANTITY.fullmatch(value):
                raise ManifestError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 4, "
                                    "500m, 16Gi)")
        if self.kueue_queue is not None and (not _DNS_LABEL.fullmatch(self.kueue_queue)
                                             or len(self.kueue_queue) > 63):
            raise ManifestError(f"--kueue-queue {self.kueue_queue!r} is not a LocalQueue name")
        if self.initial is not None and not self.min_nodes <= self.initial <= self.max_nodes:
            raise ManifestError(f"--initial {self.initial}: give a number of worker pods from "
                                f"{self.min_nodes} to {self.max_nodes} (--nnodes)")
        _check_command(self.command)

    @property
    def workers_per_pod(self) -> int:
        return self.nproc if self.nproc is not None else max(self.gpus, 1)

    @property
    def initial_pods(self) -> int:
        if self.initial is not None:
            return self.initial
        return self.min_nodes if self.kueue_queue else self.max_nodes

    @property
    def endpoint(self) -> str:
        return f"{self.name}-etcd:{CLIENT_PORT}"


def _check_command(command: Sequence[str]) -> None:
    words = list(command)
    while words and words[0] in ("-m", "--module", "--no-python", "--no_python"):
        words.pop(0)
    if not words or words[0].startswith("-"):
        raise ManifestError("no training script: end the command with -- SCRIPT ARGS... (the "
                            "script's path inside the image, or -m MODULE)")


# -- the objects ---------------------------------------------------------------------------------
def render(spec: ManifestSpec) -> List[Dict[str, Any]]:
    """Every object of the job, in an order `kubectl apply -f` can create them in."""
    docs = _rbac(spec) + _etcd(spec)
    docs.append(_object("v1", "ConfigMap", f"{spec.name}-worker-template", spec, "worker",
                        data={TEMPLATE_KEY: _yaml(worker_pod(spec))}))
    if spec.pod_group:
        docs.append(_object("scheduling.x-k8s.io/v1alpha1", "PodGroup", spec.name, spec, "worker",
                            spec={"minMember": spec.min_nodes}))
    if spec.network_policy:
        docs.append(_object("networking.k8s.io/v1", "NetworkPolicy", f"{spec.name}-pods", spec,
                            None, spec={"podSelector": {"matchLabels": {JOB_LABEL: spec.name}},
                                        "policyTypes": ["Ingress"],
                                        "ingress": [{"from": [{"podSelector": {"matchLabels": {
                                            JOB_LABEL: spec.name}}}]}]}))
    docs.append(_controller(spec))
    return docs


def agent_command(spec: ManifestSpec) -> List[str]:
    """The worker container's command: this pod's agent (Kubernetes expands $(VAR))."""
    argv = ["python", "-m", "elastic.run", "--nnodes", f"{spec.min_nodes}:{spec.max_nodes}",
            "--nproc-per-node", str(spec.workers_per_pod), "--rdzv-backend", "etcd",
            "--rdzv-endpoint", spec.endpoint, "--rdzv-id", spec.name,
            "--local-addr", "$(POD_IP)", "--node-label", f"{POD_NODE_LABEL}=$(POD_NAME)",
            "--preemption-k8s", "--preemption-grace",
            str(spec.grace_period - PRESTOP_PAUSE_S)]
    if spec.spot:
        argv += ["--node-label", "capacity-type=spot"]
    if spec.tls:
        argv += ["--rdzv-conf", f"protocol=https,cacert={TLS_DIR}/ca.crt,"
                                f"cert={TLS_DIR}/tls.crt,key={TLS_DIR}/tls.key"]
    return argv + list(spec.command)


def worker_pod(spec: ManifestSpec) -> Dict[str, Any]:
    """The v1 Pod the controller makes each worker from (it sets name and namespace)."""
    labels = {JOB_LABEL: spec.name, ROLE_LABEL: WORKER_ROLE}
    annotations = {SLOTS_ANNOTATION: str(spec.workers_per_pod)}
    pod_spec: Dict[str, Any] = {"serviceAccountName": f"{spec.name}-worker",
                                "restartPolicy": "Never",
                                "terminationGracePeriodSeconds": spec.grace_period}
    if spec.pod_group:
        labels[POD_GROUP_LABEL] = spec.name
        pod_spec["schedulerName"] = POD_GROUP_SCHEDULER
    if spec.kueue_queue:
        labels.update({KUEUE_QUEUE: spec.kueue_queue, KUEUE_GROUP: spec.name})
        annotations[KUEUE_COUNT] = str(spec.initial_pods)
    tolerations = []
    if spec.spot:
        pod_spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": k, "operator": "In",
                                                         "values": [v]}]}
                                  for k, v in SPOT_NODE_LABELS]}}}
        tolerations += [{"key": k, "operator": "Equal", "value": v, "effect": "NoSchedule"}
                        for k, v in SPOT_TAINTS]
    if spec.gpus:
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists",
                            "effect": "NoSchedule"})
    if tolerations:
        pod_spec["tolerations"] = tolerations
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: List[Dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if spec.tls:
        mounts.append({"name": "etcd-tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append(_tls_volume(spec))
    container = {
        "name": "agent", "image": spec.image, "command": agent_command(spec),
        "env": [_field_env("POD_NAME", "metadata.name"),
                _field_env("POD_NAMESPACE", "metadata.namespace"),
                _field_env("POD_IP", "status.podIP")],
        "lifecycle": {"preStop": {"exec": {"command": [
            "python", "-c", f"import time; time.sleep({PRESTOP_PAUSE_S})"]}}},
        "volumeMounts": mounts,
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    pod_spec.update(containers=[container], volumes=volumes)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}


def _resources(spec: ManifestSpec) -> Dict[str, Dict[str, Any]]:
    requests: Dict[str, Any] = {}
    limits: Dict[str, Any] = {}
    if spec.cpu:
        requests["cpu"] = spec.cpu  # no CPU limit: throttling slows the collectives of all ranks
    if spec.memory:
        requests["memory"] = limits["memory"] = spec.memory
    if spec.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = spec.gpus
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _etcd(spec: ManifestSpec) -> List[Dict[str, Any]]:
    name, ns = f"{spec.name}-etcd", spec.namespace
    scheme = "https" if spec.tls else "http"
    labels = _labels(spec, "etcd")
    peers = ",".join(f"{name}-{i}={scheme}://{name}-{i}.{name}.{ns}.svc:{PEER_PORT}"
                     for i in range(spec.etcd_replicas))
    args = ["etcd", "--name=$(POD_NAME)", "--data-dir=/var/lib/etcd",
            f"--listen-client-urls={scheme}://0.0.0.0:{CLIENT_PORT}",
            f"--advertise-client-urls={scheme}://$(POD_NAME).{name}.{ns}.svc:{CLIENT_PORT}",
            f"--listen-peer-urls={scheme}://0.0.0.0:{PEER_PORT}",
            f"--initial-advertise-peer-urls={scheme}://$(POD_NAME).{name}.{ns}.svc:{PEER_PORT}",
            f"--initial-cluster={peers}", "--initial-cluster-state=new",
            f"--initial-cluster-token={name}",
            f"--listen-metrics-urls=http://0.0.0.0:{METRICS_PORT}",
            # as the embedded etcd: old revisions of the rewritten keys must not fill the quota
            "--auto-compaction-mode=periodic", "--auto-compaction-retention=1h"]
    container: Dict[str, Any] = {
        "name": "etcd", "image": ETCD_IMAGE, "command": args,
        "env": [_field_env("POD_NAME", "metadata.name")],
        "ports": [{"name": "client", "containerPort": CLIENT_PORT},
                  {"name": "peer", "containerPort": PEER_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        # /health answers only with a quorum: a member without one takes no client traffic
        "readinessProbe": {"httpGet": {"path": "/health", "port": METRICS_PORT},
                           "periodSeconds": 5},
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}]}
    pod_spec: Dict[str, Any] = {"automountServiceAccountToken": False, "containers": [container],
                                "affinity": {"nodeAffinity": _avoid_spot()}}
    if spec.tls:
        d = TLS_DIR
        args += [f"--cert-file={d}/tls.crt", f"--key-file={d}/tls.key",
                 f"--trusted-ca-file={d}/ca.crt", "--client-cert-auth",
                 f"--peer-cert-file={d}/tls.crt", f"--peer-key-file={d}/tls.key",
                 f"--peer-trusted-ca-file={d}/ca.crt", "--peer-client-cert-auth"]
        container["volumeMounts"].append({"name": "etcd-tls", "mountPath": d, "readOnly": True})
        pod_spec["volumes"] = [_tls_volume(spec)]
    if spec.etcd_replicas > 1:
        pod_spec["affinity"]["podAntiAffinity"] = {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
                "labelSelector": {"matchLabels": labels},
                "topologyKey": "kubernetes.io/hostname"}}]}
    service = _object("v1", "Service", name, spec, "etcd", spec={
        # peers find each other by name before they are ready, and only then form a quorum
        "clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels,
        "ports": [{"name": "client", "port": CLIENT_PORT, "targetPort": CLIENT_PORT},
                  {"name": "peer", "port": PEER_PORT, "targetPort": PEER_PORT}]})
    statefulset = _object("apps/v1", "StatefulSet", name, spec, "etcd", spec={
        "serviceName": name, "replicas": spec.etcd_replicas,
        "podManagementPolicy": "Parallel",  # members start together: none is ready alone
        "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        # the job's etcd is the job's: its volumes go with the StatefulSet (Kubernetes 1.27+)
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
        "volumeClaimTemplates": [{"metadata": {"name": "data", "labels": labels}, "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": spec.etcd_storage}}}}]})
    docs = [service, statefulset]
    if spec.etcd_replicas > 1:
        docs.append(_object("policy/v1", "PodDisruptionBudget", name, spec, "etcd", spec={
            "minAvailable": spec.etcd_replicas // 2 + 1, "selector": {"matchLabels": labels}}))
    return docs


def _avoid_spot() -> Dict[str, Any]:
    return {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {
        "matchExpressions": [{"key": k, "operator": "NotIn", "values": [v]}
                             for k, v in SPOT_NODE_LABELS]}}]}


def _controller(spec: ManifestSpec) -> Dict[str, Any]:
    labels = _labels(spec, "controller")
    command = ["python", "-m", "integrations.kubernetes", "controller", "--job", spec.name,
               "--rdzv-endpoint", spec.endpoint,
               "--template", f"{TEMPLATE_DIR}/{TEMPLATE_KEY}", "--namespace", spec.namespace,
               "--initial", str(spec.initial_pods)]
    if spec.tls:
        command += ["--cacert", f"{TLS_DIR}/ca.crt", "--cert", f"{TLS_DIR}/tls.crt",
                    "--key", f"{TLS_DIR}/tls.key"]
    container = {"name": "controller", "image": spec.image, "command": command,
                 "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                 "volumeMounts": [{"name": "template", "mountPath": TEMPLATE_DIR,
                                   "readOnly": True}]}
    volumes: List[Dict[str, Any]] = [{"name": "template", "configMap": {
        "name": f"{spec.name}-worker-template"}}]
    if spec.tls:
        container["volumeMounts"].append({"name": "etcd-tls", "mountPath": TLS_DIR,
                                          "readOnly": True})
        volumes.append(_tls_volume(spec))
    # A Job, not a Deployment: the controller exits 0 once the job has ended, and that is final;
    # a failure restarts it (it continues from etcd and the API server). One pod at a time.
    return _object("batch/v1", "Job", f"{spec.name}-controller", spec, "controller", spec={
        "parallelism": 1, "completions": 1, "backoffLimit": CONTROLLER_RESTARTS,
        "template": {"metadata": {"labels": labels}, "spec": {
            "restartPolicy": "OnFailure",
            "serviceAccountName": f"{spec.name}-controller", "containers": [container],
            "volumes": volumes}}})


def _rbac(spec: ManifestSpec) -> List[Dict[str, Any]]:
    job, ns = spec.name, spec.namespace
    cluster_name = f"{ns}-{job}-worker-nodes"  # cluster-wide: the namespace keeps it apart
    docs = []
    for who, rules in (("worker", [_rule("pods", "get", "watch")]),
                       ("controller", [_rule("pods", "get", "list", "watch", "create", "delete",
                                             "patch")])):
        account = f"{job}-{who}"
        docs += [_object("v1", "ServiceAccount", account, spec, who),
                 _object("rbac.authorization.k8s.io/v1", "Role", account, spec, who,
                         rules=rules),
                 _object("rbac.authorization.k8s.io/v1", "RoleBinding", account, spec, who,
                         roleRef=_role_ref("Role", account),
                         subjects=[_subject(account, ns)])]
    docs += [_object("rbac.authorization.k8s.io/v1", "ClusterRole", cluster_name, spec, "worker",
                     namespaced=False, rules=[_rule("nodes", "get", "watch")]),
             _object("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", cluster_name, spec,
                     "worker", namespaced=False, roleRef=_role_ref("ClusterRole", cluster_name),
                     subjects=[_subject(f"{job}-worker", ns)])]
    return docs


def _rule(resource: str, *verbs: str) -> Dict[str, Any]:
    return {"apiGroups": [""], "resources": [resource], "verbs": list(verbs)}


def _role_ref(kind: str, name: str) -> Dict[str, str]:
    return {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}


def _subject(account: str, namespace: str) -> Dict[str, str]:
    return {"kind": "ServiceAccount", "name": account, "namespace": namespace}


def _labels(spec: ManifestSpec, role: Optional[str]) -> Dict[str, str]:
    return {JOB_LABEL: spec.name, **({ROLE_LABEL: role} if role else {})}


def _object(api_version: str, kind: str, name: str, job: ManifestSpec, role: Optional[str],
            namespaced: bool = True, **body: Any) -> Dict[str, Any]:
    """An object of the job, labelled with it (and the role its pods or it serves)."""
    meta = {"name": name, **({"namespace": job.namespace} if namespaced else {}),
            "labels": _labels(job, role)}
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, **body}


def _field_env(name: str, path: str) -> Dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _tls_volume(spec: ManifestSpec) -> Dict[str, Any]:
    return {"name": "etcd-tls", "secret": {"secretName": f"{spec.name}-etcd-tls"}}


def to_yaml(docs: Sequence[Any]) -> str:
    """YAML documents as people write them: no anchors, multi-line strings as blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    def text(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False)


def _yaml(obj: Any) -> str:
    return to_yaml([obj])


# -- the command line ----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ManifestError(f"{message}; run `{self.prog} --help` for the usage")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m integrations.kubernetes render",
                usage="%(prog)s --name JOB --image IMG --nnodes MIN:MAX [options] -- SCRIPT "
                      "ARGS...",
                description="Print the manifests of an elastic job (etcd, RBAC, the worker pod "
                            "template and its controller) as YAML for kubectl apply -f -.")
    p.add_argument("--name", required=True, help="the job: names its objects, its --rdzv-id")
    p.add_argument("--image", required=True, help="an image with this project installed")
    p.add_argument("--nnodes", required=True, help="worker pods, MIN:MAX (or N)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="workers per pod (default: --gpus-per-node, else 1)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--gpus-per-node", type=int, default=0, help="nvidia.com/gpu per pod")
    p.add_argument("--spot", action="store_true",
                   help="workers on spot nodes (GKE, AKS, EKS, Karpenter labels), labelled "
                        "capacity-type=spot for the job")
    p.add_argument("--tls", action="store_true",
                   help="etcd over https with the Secret <job>-etcd-tls (ca.crt, tls.crt, "
                        "tls.key) that you create")
    p.add_argument("--pod-group", action="store_true",
                   help="gang-schedule MIN workers with scheduler-plugins' coscheduling")
    p.add_argument("--kueue-queue", default=None, metavar="QUEUE",
                   help="queue the workers as one Kueue plain-pod group in this LocalQueue")
    p.add_argument("--etcd-replicas", type=int, default=1, help="1 (default) or 3")
    p.add_argument("--etcd-storage", default="1Gi", help="each etcd member's volume")
    p.add_argument("--grace-period", type=int, default=DEFAULT_GRACE_S,
                   help=f"the worker pods' terminationGracePeriodSeconds (default "
                        f"{DEFAULT_GRACE_S})")
    p.add_argument("--cpu", default=None, help="CPU request per worker pod, e.g. 8")
    p.add_argument("--memory", default=None, help="memory per worker pod, e.g. 64Gi")
    p.add_argument("--initial", type=int, default=None,
                   help="worker pods to start with (default MAX; with --kueue-queue MIN)")
    p.add_argument("--network-policy", action="store_true",
                   help="a NetworkPolicy letting the job's pods reach each other on any port "
                        "(for namespaces that deny ingress by default)")
    return p


def parse_nnodes(text: str) -> Tuple[int, int]:
    parts = text.split(":")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise ManifestError(f"--nnodes {text!r} is not N or MIN:MAX (for example 2 or 1:4)")
    low, high = int(parts[0]), int(parts[-1])
    return low, high


def spec_from_argv(argv: Sequence[str]) -> ManifestSpec:
    """Raises ManifestError for every problem, argparse's included."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    else:
        command = []
    args = build_parser().parse_args(argv)
    low, high = parse_nnodes(args.nnodes)
    return ManifestSpec(
        name=args.name, image=args.image, command=tuple(command), min_nodes=low, max_nodes=high,
        nproc=args.nproc_per_node, namespace=args.namespace, gpus=args.gpus_per_node,
        spot=args.spot, tls=args.tls, pod_group=args.pod_group, kueue_queue=args.kueue_queue,
        etcd_replicas=args.etcd_replicas, grace_period=args.grace_period, cpu=args.cpu,
        memory=args.memory, initial=args.initial, network_policy=args.network_policy,
        etcd_storage=args.etcd_storage)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        text = to_yaml(render(spec_from_argv(argv)))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except ImportError as exc:
        print(f"error: {exc}; install the [kubernetes] extra: pip install "
              "'elastic-run[kubernetes]'", file=sys.stderr)
        return USAGE_ERROR
    sys.stdout.write(text)
    return 0
