"""Kubernetes: pod evictions and node-termination taints as preemption notices, pod discovery,
a scaling controller for worker pods, and manifests (`python -m integrations.kubernetes`).

Everything here talks to the API server through the official `kubernetes` client (the
`[kubernetes]` extra), imported lazily; the decisions are pure functions over the client's
model objects (`notice.pod_notice`, `discovery.live_hosts`, `controller.reconcile`,
`manifests.render`).
"""
