"""`python -m integrations.horovod.discover`: a job's live hosts, for horovodrun's
`--host-discovery-script`.

Prints one `host:slots` line per host of the agents registered in the job's etcd rendezvous (the
host each agent registered, slots: its --nproc-per-node, summed over the agents of one host), in
the order they joined; nothing when no agent is registered. horovodrun runs the script through
a shell every second, so wrap the command:

    #!/bin/sh
    exec python -m integrations.horovod.discover --rdzv-endpoint etcd-host:2379 --rdzv-id my-job

Exit codes: 0, or 1 with one line on stderr when etcd cannot be reached (horovodrun logs it and
asks again), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Mapping, Optional, Tuple

from rendezvous.api import NodeInfo, RendezvousConnectionError

DEFAULT_TIMEOUT_S = 5.0


def hosts(nodes: Mapping[str, NodeInfo]) -> List[Tuple[str, int]]:
    """(host, slots) of the registered nodes, hosts in the order their first agent joined."""
    slots: Dict[str, int] = {}
    for info in sorted(nodes.values(), key=lambda n: (n.joined_at, n.node_id)):
        slots[info.host] = slots.get(info.host, 0) + info.nproc
    return list(slots.items())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m integrations.horovod.discover",
        description="Print the live hosts of an elastic job as host:slots lines "
                    "(horovodrun --host-discovery-script format).")
    parser.add_argument("--rdzv-endpoint", required=True, help="the job's etcd, host:port")
    parser.add_argument("--rdzv-id", required=True, help="the job's id")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds to wait for etcd (default {DEFAULT_TIMEOUT_S:g})")
    args = parser.parse_args(argv)

    from rendezvous.connect import format_endpoint, parse_endpoint
    from rendezvous.store import EtcdStore

    try:
        endpoint = format_endpoint(*parse_endpoint(args.rdzv_endpoint))
    except ValueError as exc:
        parser.error(f"--rdzv-endpoint: {exc}")
    try:
        store = EtcdStore(endpoint, args.rdzv_id, timeout=args.timeout)
        try:
            nodes = store.snapshot().nodes
        finally:
            store.close()
    except RendezvousConnectionError:
        print(f"error: etcd at {endpoint} did not answer within {args.timeout:g}s; pass the "
              "--rdzv-endpoint the job's agents use", file=sys.stderr)
        return 1
    for host, count in hosts(nodes):
        print(f"{host}:{count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
