"""Connecting to the API server, and this pod's own identity.

`connect()` uses the in-cluster service account when running in a pod, else a kubeconfig
($KUBECONFIG or ~/.kube/config, or the path given); anything else is a `KubernetesConfigError`
whose one-line message says what to do. `require_kubernetes()` names the extra to install.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

EXTRA_HINT = "install the [kubernetes] extra: pip install 'elastic-run[kubernetes]'"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Set by the rendered manifests through the downward API.
ENV_POD_NAME, ENV_POD_NAMESPACE = "POD_NAME", "POD_NAMESPACE"


class KubernetesConfigError(RuntimeError):
    """No way to reach an API server; the message says what to set."""


def require_kubernetes() -> Any:
    """The `kubernetes` package, or ImportError saying which extra to install."""
    try:
        import kubernetes
    except ImportError as exc:
        raise ImportError(f"the kubernetes client cannot be imported ({exc}); {EXTRA_HINT}") \
            from None
    return kubernetes


def connect(kubeconfig: Optional[str] = None, context: Optional[str] = None) -> Any:
    """An ApiClient for the in-cluster API server, else for the kubeconfig's (current) context.

    Raises:
        ImportError: the [kubernetes] extra is not installed.
        KubernetesConfigError: neither an in-cluster service account nor a usable kubeconfig.
    """
    require_kubernetes()
    from kubernetes import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException as exc:
            raise KubernetesConfigError(f"in-cluster Kubernetes config is unusable ({exc}); mount "
                                        "the pod's service account token") from None
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    path = path.split(os.pathsep)[0]
    if not os.path.exists(path):
        raise KubernetesConfigError(
            f"no in-cluster Kubernetes config (not in a pod) and no kubeconfig at {path}; run in a "
            "pod with a service account, or set KUBECONFIG")
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=path, context=context,
                                client_configuration=configuration)
    except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        raise KubernetesConfigError(f"kubeconfig {path} is unusable ({exc}); fix it or set "
                                    "KUBECONFIG") from None
    return client.ApiClient(configuration)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def own_pod(name: Optional[str] = None, namespace: Optional[str] = None) -> PodRef:
    """This process's pod: $POD_NAME (else the hostname, which is the pod's name) in
    $POD_NAMESPACE (else the service account's namespace, else "default")."""
    name = name or os.environ.get(ENV_POD_NAME) or socket.gethostname()
    if not namespace:
        namespace = os.environ.get(ENV_POD_NAMESPACE)
    if not namespace:
        try:
            with open(SERVICE_ACCOUNT_NAMESPACE) as f:
                namespace = f.read().strip()
        except OSError:
            namespace = ""
    return PodRef(namespace or "default", name)
