"""`python -m integrations.kubernetes render`: every variant's objects validated against
Kubernetes' own schemas (kubernetes-validate ships them; strict: no unknown field), the worker
pod template inside its ConfigMap validated as a Pod, its agent command parsed by elastic.run's
own parser, and bad input refused with one line. No cluster: pure rendering."""
import functools
import json
import shlex

import pytest

from integrations.kubernetes import manifests as m
from integrations.kubernetes.manifests import ManifestError, ManifestSpec, render

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

K8S_VERSION = "1.30"
# scheduler-plugins' PodGroup CRD (scheduling.x-k8s.io/v1alpha1) has no schema in
# kubernetes-validate; this one is written from the CRD's spec fields (minMember,
# minResources, scheduleTimeoutSeconds), strict like the others.
POD_GROUP_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "scheduling.x-k8s.io/v1alpha1"},
        "kind": {"const": "PodGroup"},
        "metadata": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": {"type": "string"},
                                    "namespace": {"type": "string"},
                                    "labels": {"type": "object",
                                               "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["minMember"], "additionalProperties": False,
                 "properties": {"minMember": {"type": "integer", "minimum": 1,
                                              "maximum": 2 ** 31 - 1},
                                "minResources": {"type": "object"},
                                "scheduleTimeoutSeconds": {"type": "integer", "minimum": 0}}},
    },
}
BASE = ["--name", "train", "--image", "reg.example.com/train:1", "--nnodes", "2:4"]
COMMAND = ["--", "train.py", "--lr", "0.1"]
VARIANTS = {
    "plain": [],
    "tls": ["--tls"],
    "spot": ["--spot"],
    "gpus": ["--gpus-per-node", "8"],
    "pod-group": ["--pod-group"],
    "kueue": ["--kueue-queue", "team-a"],
    "etcd-3": ["--etcd-replicas", "3"],
    "network-policy": ["--network-policy"],
    "resources": ["--namespace", "ml", "--cpu", "8", "--memory", "64Gi", "--initial", "3",
                  "--nproc-per-node", "2", "--grace-period", "120"],
    "everything": ["--namespace", "ml", "--tls", "--spot", "--gpus-per-node", "8",
                   "--pod-group", "--kueue-queue", "team-a", "--etcd-replicas", "3",
                   "--network-policy", "--cpu", "16", "--memory", "128Gi"],
    "gang-on-spot-gpus": ["--spot", "--gpus-per-node", "4", "--pod-group", "--tls"],
}


def spec_of(extra, command=COMMAND):
    return m.spec_from_argv(BASE + list(extra) + list(command))


def by_kind(docs):
    out = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def template_of(docs):
    [cm] = by_kind(docs)["ConfigMap"]
    return yaml.safe_load(cm["data"][m.TEMPLATE_KEY])


def agent_args(pod, pod_ip="10.1.2.3", pod_name="train-worker-0"):
    """The agent's command as Kubernetes runs it ($(VAR) expanded), parsed by elastic.run."""
    from elastic.flags import build_parser, parse_with_torchrun_env

    [container] = pod["spec"]["containers"]
    argv = [a.replace("$(POD_IP)", pod_ip).replace("$(POD_NAME)", pod_name)
            for a in container["command"]]
    assert argv[:3] == ["python", "-m", "elastic.run"]
    args, used = parse_with_torchrun_env(build_parser(), argv[3:], {})
    assert used == ()
    return args


def validate(doc):
    _validate(json.dumps(doc, sort_keys=True))


@functools.lru_cache(maxsize=None)  # variants share most objects; each is checked once
def _validate(text):
    doc = json.loads(text)
    if doc["kind"] == "PodGroup":
        jsonschema.validate(doc, POD_GROUP_SCHEMA)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_is_valid_for_its_schema(variant):
    docs = render(spec_of(VARIANTS[variant]))
    for doc in docs:
        validate(doc)
    validate(template_of(docs))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_agent_command_parses_with_elastic_runs_parser(variant):
    spec = spec_of(VARIANTS[variant])
    args = agent_args(template_of(render(spec)))
    from elastic.cli import parse_labels, parse_nnodes, parse_rdzv_conf

    assert parse_nnodes(args.nnodes) == (spec.min_nodes, spec.max_nodes)
    assert int(args.nproc_per_node) == spec.workers_per_pod
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == (
        "etcd", "train-etcd:2379", "train")
    assert args.local_addr == "10.1.2.3" and args.preemption_k8s
    assert args.preemption_grace == spec.grace_period - m.PRESTOP_PAUSE_S
    labels = parse_labels(args.node_label)
    assert labels["pod"] == "train-worker-0"
    assert labels.get("capacity-type") == ("spot" if spec.spot else None)
    parse_rdzv_conf(args.rdzv_conf)
    assert (args.script, args.script_args) == ("train.py", ["--lr", "0.1"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_controller_can_load_the_template_and_parse_its_command(variant, tmp_path):
    controller = pytest.importorskip("integrations.kubernetes.controller")
    spec = spec_of(VARIANTS[variant])
    docs = render(spec)
    [cm] = by_kind(docs)["ConfigMap"]
    path = tmp_path / m.TEMPLATE_KEY
    path.write_text(cm["data"][m.TEMPLATE_KEY])
    template = controller.load_template(str(path))
    controller.check_names(spec.name)
    pod = controller.worker_pod(template, "train-worker-0", spec.namespace, spec.name)
    validate(pod)
    [controller_job] = by_kind(docs)["Job"]
    [container] = controller_job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:4] == ["python", "-m", "integrations.kubernetes", "controller"]
    args = controller.build_parser().parse_args(container["command"][4:])
    assert (args.job, args.rdzv_endpoint, args.namespace) == (
        "train", "train-etcd:2379", spec.namespace)
    assert args.template == f"{m.TEMPLATE_DIR}/{m.TEMPLATE_KEY}"
    assert args.initial == spec.initial_pods
    if spec.tls:  # the controller reaches a TLS etcd with the Secret's files
        assert (args.cacert, args.cert, args.key) == tuple(
            f"{m.TLS_DIR}/{f}" for f in ("ca.crt", "tls.crt", "tls.key"))
    else:
        assert args.cacert is None
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    volumes = {v["name"]: v for v in controller_job["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[m.TEMPLATE_DIR]]["configMap"]["name"] == "train-worker-template"


def test_plain_job():
    docs = render(spec_of([]))
    kinds = by_kind(docs)
    assert sorted(kinds) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Job", "Role",
                             "RoleBinding", "Service", "ServiceAccount", "StatefulSet"]
    [service] = kinds["Service"]
    assert service["metadata"]["name"] == "train-etcd" and service["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"client": 2379,
                                                                       "peer": 2380}
    [sts] = kinds["StatefulSet"]
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "train-etcd"
    [etcd] = sts["spec"]["template"]["spec"]["containers"]
    assert etcd["image"].startswith("quay.io/coreos/etcd:v3.5.")
    assert ("--initial-cluster=train-etcd-0=http://train-etcd-0.train-etcd.default.svc:2380"
            in etcd["command"])
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"

    pod = template_of(docs)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"] == {"elastic.run/job": "train", "elastic.run/role": "worker"}
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 60
    assert spec["serviceAccountName"] == "train-worker"
    assert "schedulerName" not in spec and "affinity" not in spec
    [container] = spec["containers"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "POD_IP": "status.podIP"}
    assert container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["python", "-c"]
    assert "resources" not in container
    assert shlex.join(container["command"]).endswith("train.py --lr 0.1")


def test_rbac_is_minimal():
    kinds = by_kind(render(spec_of([])))
    roles = {r["metadata"]["name"]: r["rules"] for r in kinds["Role"]}
    assert roles == {
        "train-worker": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "watch"]}],
        "train-controller": [{"apiGroups": [""], "resources": ["pods"], "verbs": [
            "get", "list", "watch", "create", "delete", "patch"]}]}
    [cluster_role] = kinds["ClusterRole"]
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"],
                                      "verbs": ["get", "watch"]}]
    [binding] = kinds["ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "train-worker",
                                    "namespace": "default"}]
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"] \
        == "default-train-worker-nodes"
    for b in kinds["RoleBinding"]:
        assert b["roleRef"]["name"] == b["subjects"][0]["name"] == b["metadata"]["name"]
    [controller_job] = kinds["Job"]
    assert controller_job["spec"]["template"]["spec"]["serviceAccountName"] == "train-controller"
    # a Job: the controller's exit 0 when the training job ends is final; a failure restarts it
    assert controller_job["spec"]["parallelism"] == controller_job["spec"]["completions"] == 1
    assert controller_job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_tls():
    docs = render(spec_of(["--tls"]))
    [sts] = by_kind(docs)["StatefulSet"]
    pod_spec = sts["spec"]["template"]["spec"]
    [etcd] = pod_spec["containers"]
    flags = dict(a.split("=", 1) for a in etcd["command"][1:] if "=" in a)
    assert flags["--listen-client-urls"].startswith("https://")
    assert flags["--initial-cluster"].count("https://") == 1
    for key, name in (("--cert-file", "tls.crt"), ("--key-file", "tls.key"),
                      ("--trusted-ca-file", "ca.crt"), ("--peer-cert-file", "tls.crt")):
        assert flags[key] == f"{m.TLS_DIR}/{name}"
    assert "--client-cert-auth" in etcd["command"] and "--peer-client-cert-auth" in etcd["command"]
    assert pod_spec["volumes"] == [{"name": "etcd-tls", "secret": {"secretName": "train-etcd-tls"}}]
    args = agent_args(template_of(docs))
    conf = dict(item.split("=") for item in args.rdzv_conf.split(","))
    assert conf == {"protocol": "https", "cacert": f"{m.TLS_DIR}/ca.crt",
                    "cert": f"{m.TLS_DIR}/tls.crt", "key": f"{m.TLS_DIR}/tls.key"}
    [container] = template_of(docs)["spec"]["containers"]
    assert {"name": "etcd-tls", "mountPath": m.TLS_DIR, "readOnly": True} \
        in container["volumeMounts"]


def test_spot():
    docs = render(spec_of(["--spot"]))
    spec = template_of(docs)["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    found = {(t["matchExpressions"][0]["key"], t["matchExpressions"][0]["values"][0])
             for t in terms}
    assert found == set(m.SPOT_NODE_LABELS)  # any one of them (terms are ORed)
    assert {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal",
            "value": "spot", "effect": "NoSchedule"} in spec["tolerations"]
    [sts] = by_kind(docs)["StatefulSet"]  # etcd prefers on-demand nodes
    preferred = sts["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert {e["operator"] for e in preferred[0]["preference"]["matchExpressions"]} == {"NotIn"}


def test_gpus():
    pod = template_of(render(spec_of(["--gpus-per-node", "8", "--memory", "64Gi"])))
    [container] = pod["spec"]["containers"]
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": 8}
    assert agent_args(pod).nproc_per_node == "8"
    assert pod["metadata"]["annotations"]["elastic.run/slots"] == "8"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in pod["spec"]["tolerations"]
    pod = template_of(render(spec_of(["--gpus-per-node", "8", "--nproc-per-node", "2"])))
    assert agent_args(pod).nproc_per_node == "2"


def test_pod_group():
    docs = render(spec_of(["--pod-group"]))
    [group] = by_kind(docs)["PodGroup"]
    assert group["metadata"]["name"] == "train" and group["spec"] == {"minMember": 2}
    pod = template_of(docs)
    assert pod["metadata"]["labels"][m.POD_GROUP_LABEL] == "train"
    assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"


def test_kueue_group_is_admitted_for_the_initial_pods():
    docs = render(spec_of(["--kueue-queue", "team-a"]))
    meta = template_of(docs)["metadata"]
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert meta["labels"]["kueue.x-k8s.io/pod-group-name"] == "train"
    assert meta["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"  # MIN
    [controller_job] = by_kind(docs)["Job"]
    command = controller_job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--initial") + 1] == "2"
    meta = template_of(render(spec_of(["--kueue-queue", "team-a", "--initial", "3"])))["metadata"]
    assert meta["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "3"
    # without Kueue the controller starts MAX pods
    [controller_job] = by_kind(render(spec_of([])))["Job"]
    command = controller_job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--initial") + 1] == "4"


def test_three_etcd_members():
    docs = render(spec_of(["--etcd-replicas", "3", "--namespace", "ml"]))
    [sts] = by_kind(docs)["StatefulSet"]
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    [etcd] = sts["spec"]["template"]["spec"]["containers"]
    [cluster] = [a for a in etcd["command"] if a.startswith("--initial-cluster=")]
    assert cluster.split("=", 1)[1] == ",".join(
        f"train-etcd-{i}=http://train-etcd-{i}.train-etcd.ml.svc:2380" for i in range(3))
    [service] = by_kind(docs)["Service"]
    assert service["spec"]["publishNotReadyAddresses"] is True
    [pdb] = by_kind(docs)["PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 2


def test_network_policy_admits_the_jobs_own_pods():
    docs = render(spec_of(["--network-policy"]))
    [policy] = by_kind(docs)["NetworkPolicy"]
    job = {"elastic.run/job": "train"}
    assert policy["spec"]["podSelector"] == {"matchLabels": job}
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": job}}]}]
    for doc in docs:  # every pod the job runs carries the label the policy selects
        template = doc.get("spec", {}).get("template")
        if template:
            assert template["metadata"]["labels"]["elastic.run/job"] == "train"
    assert template_of(docs)["metadata"]["labels"]["elastic.run/job"] == "train"


def test_main_prints_the_documents(capsys):
    assert m.main(BASE + ["--tls"] + COMMAND) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert list(yaml.safe_load_all(out)) == render(spec_of(["--tls"]))
    assert "&id" not in out  # no YAML anchors: people read and edit this


def test_module_dispatch(capsys):
    from integrations.kubernetes.__main__ import main

    assert main(["render"] + BASE + COMMAND) == 0
    assert "kind: StatefulSet" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (BASE[:-1] + ["x"] + COMMAND, "--nnodes 'x' is not N or MIN:MAX"),
    (BASE[:-1] + ["3:1"] + COMMAND, "--nnodes 3:1: MIN must be at least 1"),
    (BASE[:-1] + ["0:2"] + COMMAND, "--nnodes 0:2: MIN must be at least 1"),
    (BASE + ["--etcd-replicas", "2"] + COMMAND, "--etcd-replicas 2: use 1, or 3"),
    (["--name", "Train_1"] + BASE[2:] + COMMAND, "--name 'Train_1': use lowercase"),
    (["--name", "a" * 48] + BASE[2:] + COMMAND, "at most 47"),
    (BASE, "no training script"),
    (BASE + ["--"], "no training script"),
    (BASE + ["--", "-m"], "no training script"),
    (BASE + ["--", "--lr", "1"], "no training script"),
    (BASE + ["--grace-period", "5"] + COMMAND, "--grace-period 5: give at least 15"),
    (BASE + ["--cpu", "lots"] + COMMAND, "--cpu 'lots' is not a Kubernetes quantity"),
    (BASE + ["--initial", "9"] + COMMAND, "--initial 9: give a number of worker pods from 2 to 4"),
    (BASE + ["--namespace", "ML"] + COMMAND, "--namespace 'ML' is not a namespace name"),
    (BASE + ["--image", "a b"] + COMMAND, "--image 'a b'"),
    (BASE + ["--kueue-queue", "Q!"] + COMMAND, "--kueue-queue 'Q!' is not a LocalQueue name"),
    (BASE + ["--gpus-per-node", "two"] + COMMAND, "argument --gpus-per-node: invalid int"),
    (BASE[2:] + COMMAND, "the following arguments are required: --name"),
    (BASE + ["--bogus"] + COMMAND, "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    assert m.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_a_module_as_the_script():
    args = agent_args(template_of(render(spec_of([], ["--", "-m", "pkg.train", "--x"]))))
    assert args.module and (args.script, args.script_args) == ("pkg.train", ["--x"])


def test_the_spec_checks_itself():
    with pytest.raises(ManifestError, match="--etcd-replicas"):
        ManifestSpec(name="j", image="i", command=("t.py",), min_nodes=1, max_nodes=1,
                     etcd_replicas=5)
    spec = ManifestSpec(name="j", image="i", command=("t.py",), min_nodes=1, max_nodes=3)
    assert (spec.workers_per_pod, spec.initial_pods, spec.endpoint) == (1, 3, "j-etcd:2379")
