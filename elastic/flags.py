"""The flags of `python -m elastic.run`: names (with torchrun's spellings), defaults and help.

Parsing and checking them into a `RunConfig` is `elastic.cli`'s job.
"""
from __future__ import annotations

import argparse

from elastic.torchrun_compat import BACKENDS, add_torchrun_flags

RDZV_CONF_KEYS = {
    "join_timeout": float,
    "last_call_timeout": float,
    "join_settle": float,
    "lease_ttl": float,
    "connect_timeout": float,
    "blacklist_after": int,
    "blacklist_cooldown": float,
    "blacklist_max_cooldown": float,
}


class UsageError(ValueError):
    """Bad command-line input; the message says what to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and a hint, instead of argparse's usage text
        raise UsageError(f"{message}; run `{self.prog} --help` to see the flags")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m elastic.run",
        description="Start this node's elastic agent: it joins the job's etcd rendezvous and runs "
                    "--nproc-per-node workers of the training script in the current world, growing "
                    "and shrinking it as nodes join, leave or fail.",
    )
    p.add_argument("--nnodes", default="1:1", help="nodes in the job: N, or MIN:MAX for an elastic "
                   "job (default 1:1)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", default="1",
                   help="worker processes on this node: a number, or as torchrun auto (one per "
                        "GPU or other accelerator, else per CPU), cpu, gpu, xpu (default 1)")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None,
                   help="etcd v3 endpoint shared by all nodes, host:port or etcd://host:port; "
                        "omit it to start an embedded etcd on 127.0.0.1 for a one-machine job")
    p.add_argument("--rdzv-backend", "--rdzv_backend", default=None, choices=BACKENDS,
                   help="etcd (default; etcd-v2 and etcd-v3 are the same here: the etcd v3 API), "
                        "or torchrun's c10d (the agent on the endpoint's host hosts an etcd "
                        "there) or static (node rank 0 hosts an etcd at "
                        "MASTER_ADDR:MASTER_PORT; the default when --master-addr or "
                        "--node-rank is given without --rdzv-endpoint)")
    p.add_argument("--rdzv-id", "--rdzv_id", default="default",
                   help="job id: all nodes of a job use the same one; jobs sharing an etcd use "
                        "different ones (default: default)")
    p.add_argument("--rdzv-conf", "--rdzv_conf", default="",
                   help="KEY=VALUE,... with join_timeout (s a job may stay below min nodes, "
                        "default 600), last_call_timeout (s to wait for more nodes once min are "
                        "present, default 3), join_settle (s over which joins are coalesced, "
                        "default 0.2), lease_ttl (s after which a silent node is removed, default "
                        "10), connect_timeout (s to reach etcd, default 5), blacklist_after (worker "
                        "failures of a node before it sits out, default 2; 0: never), "
                        "blacklist_cooldown (s it sits out the first time, doubling each time, "
                        "default 60), blacklist_max_cooldown (cap, default 3600); a secured "
                        "etcd: cacert, cert, key (files), user (password in "
                        "$ELASTIC_ETCD_PASSWORD), protocol=https")
    p.add_argument("--standalone", action="store_true",
                   help="one-machine job on an embedded etcd (the default without --rdzv-endpoint)")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0,
                   help="worker failures the job survives before it fails; nodes joining or "
                        "leaving do not count (default 0)")
    p.add_argument("--monitor-interval", "--monitor_interval", type=float, default=0.1,
                   help="seconds between checks of the workers and the rendezvous (default 0.1)")
    p.add_argument("--log-dir", "--log_dir", default=None,
                   help="write each rank's output to LOG_DIR/round<N>/rank<R>.log and the event "
                        "log to LOG_DIR/events.jsonl")
    p.add_argument("--local-addr", "--local_addr", default=None,
                   help="address other nodes use to reach this one (default: the address that "
                        "routes to the rendezvous endpoint)")
    p.add_argument("--master-port", "--master_port", type=int, default=None,
                   help="port of the rank-0 store when this node holds rank 0 (default: a free "
                        "one); with a static rendezvous, the port of the rendezvous")
    p.add_argument("--grace-period", type=float, default=5.0,
                   help="seconds workers get after SIGTERM before they are killed (default 5)")
    p.add_argument("--backend", choices=["torch", "horovod"], default="torch",
                   help="what the workers run: torch (torchrun's environment; default) or horovod "
                        "(Horovod's gloo controller and rendezvous from the same rounds; "
                        "hvd.elastic scripts reset in place). Horovod is installed with "
                        "`bash integrations/horovod/install.sh`")
    p.add_argument("--rescale-mode", choices=["auto", "restart", "in-place"], default="auto",
                   help="how workers follow a new world: restart them (any script), or in place "
                        "(scripts using integrations.torch.run: survivors keep running, joining "
                        "nodes pre-warm their workers); auto (default) switches to in place once "
                        "the workers use the API")
    p.add_argument("--preload", default="torch,torch.distributed,torch._dynamo", metavar="MODULES",
                   help="modules a zygote process imports once per node before forking the "
                        "workers from it, so that restarted workers skip process start and these "
                        "imports (comma-separated; default torch,torch.distributed,"
                        "torch._dynamo; none: start every worker as a new process)")
    p.add_argument("--preemption-file", default=None,
                   help="a file whose appearance is this node's preemption notice (write it "
                        "elsewhere and rename it here); the node leaves at the next step boundary")
    p.add_argument("--preemption-url", default=None,
                   help="a metadata endpoint polled for a preemption notice (see "
                        "--preemption-preset)")
    p.add_argument("--preemption-preset", default="generic", choices=["generic", "aws", "gce"],
                   help="how to read the endpoint: aws (spot instance-action, polled at the "
                        "standard address unless --preemption-url), gce (instance/preempted), "
                        "generic (any 200 with a body other than false/0 is a notice)")
    p.add_argument("--preemption-poll-interval", type=float, default=1.0,
                   help="seconds between polls of the notice file and endpoint (default 1)")
    p.add_argument("--preemption-grace", type=float, default=30.0,
                   help="seconds a notice without its own deadline (SIGTERM, the file, gce) "
                        "gives this node to leave (default 30)")
    p.add_argument("--hang-timeout", type=float, default=None,
                   help="seconds without step progress after which a worker counts as hung: its "
                        "stacks are dumped to its log, it is killed and the round re-forms "
                        "(counted against --max-restarts). Workers using integrations.torch.run "
                        "report progress at each step boundary; others are not watched")
    p.add_argument("--batch-policy", choices=["fixed", "linear", "sqrt", "adascale"], default=None,
                   help="how the global batch and learning rate follow the world size: fixed "
                        "(constant global batch via micro-batches and accumulation; the default "
                        "with --global-batch-size), linear or sqrt (per-worker batch fixed, "
                        "learning rate scaled by the world or its square root), adascale "
                        "(learning rate scaled by the measured gain). The plan for each world "
                        "reaches the workers as ELASTIC_* variables")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step over all workers")
    p.add_argument("--per-worker-batch-size", type=int, default=None,
                   help="samples per worker per step (linear, sqrt, adascale)")
    p.add_argument("--reference-world-size", type=int, default=None,
                   help="world size the base learning rate was tuned for (default: the smallest "
                        "world, MIN nodes x --nproc-per-node)")
    p.add_argument("--max-micro-batch", type=int, default=None,
                   help="largest batch a worker processes at once; larger shares are split into "
                        "gradient-accumulation steps")
    p.add_argument("--lr-warmup-steps", type=int, default=0,
                   help="steps over which the learning-rate factor ramps after each change")
    p.add_argument("--node-label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label of this node (repeatable); well-known: capacity-type=spot|"
                        "on-demand (a resize down leaves spot nodes out first), zone=NAME")
    p.add_argument("--stay-as-spare", action="store_true",
                   help="when released (python -m elastic.job release), stay registered as a "
                        "pre-warmed spare instead of exiting")
    p.add_argument("--job-retention", type=float, default=86400.0, metavar="SECONDS",
                   help="how long a finished job's records stay in etcd (default 86400: a day)")
    add_torchrun_flags(p)
    p.add_argument("-m", "--module", action="store_true",
                   help="run the script as a Python module, as python -m does")
    p.add_argument("--no-python", "--no_python", action="store_true",
                   help="run the script as an executable, without python in front")
    p.add_argument("script", help="training script (or module with -m, or executable)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p
