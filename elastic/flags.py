"""The flags of `python -m elastic.run`: names (with torchrun's spellings), defaults and help.

Parsing and checking them into a `RunConfig` is `elastic.cli`'s job. As torchrun, a torchrun flag
left off the command line is read from $PET_<FLAG> (`parse_with_torchrun_env`).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

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
    p.add_argument("--preemption-k8s", action="store_true",
                   help="in a Kubernetes pod: its deletion or eviction, a DisruptionTarget "
                        "condition, or a node-termination taint on its node is a notice (the pod "
                        "is $POD_NAME in $POD_NAMESPACE; needs the [kubernetes] extra)")
    p.add_argument("--gpus-per-proc", type=int, default=None, metavar="N",
                   help="GPUs each worker has to itself: it sees only those (its first is "
                        "cuda:0); 0: leave CUDA_VISIBLE_DEVICES alone. Default: every worker "
                        "sees the node's best-connected healthy GPUs, one per local rank in "
                        "rank order (its own is cuda:LOCAL_RANK, as torchrun scripts expect). "
                        "A CUDA_VISIBLE_DEVICES already set is respected: GPUs are chosen "
                        "among those it names")
    p.add_argument("--gpu-memory-fraction", type=float, default=None, metavar="F",
                   help="share GPUs between workers: each sees one GPU, at most 1/F workers "
                        "share one, and each may use F of its memory (applied through torch "
                        "by integrations.torch.run, or elastic.gpu.setup() in a plain script)")
    p.add_argument("--gpu-probe", default="nvml", metavar="nvml|fake:PATH|none",
                   help="where this node's GPUs, their links and their health are read: nvml "
                        "(default; without an NVIDIA driver the workers run on CPU), fake:PATH "
                        "(states recorded by `python -m integrations.nvml record`, replayed; "
                        "for tests), none (do not look). A GPU of the workers' that turns "
                        "unhealthy (Xid, ECC) makes the node leave at the next step boundary; "
                        "checked every --preemption-poll-interval")
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


# torchrun reads each of these flags from PET_<NAME> (NAME upper case) when the command line leaves
# it out (torch.distributed.argparse_util's env and check_env actions); Kubeflow's PyTorchJob sets
# them. Our own flags, and torchrun's --logs-specs and --numa-binding, are not read from it.
TORCHRUN_ENV_PREFIX = "PET_"
TORCHRUN_ENV_FLAGS = frozenset({
    "nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf",
    "standalone", "max_restarts", "monitor_interval", "start_method", "event_log_handler", "role",
    "module", "no_python", "run_path", "log_dir", "redirects", "tee", "local_ranks_filter",
    "duplicate_stdout_filters", "duplicate_stderr_filters", "node_rank", "master_addr",
    "master_port", "local_addr", "signals_to_handle", "shutdown_timeout", "virtual_local_rank",
})
_FROM_COMMAND_LINE_OR_ENV = object()  # the parse-time default of those flags
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class EnvFlag:
    """A flag's value taken from torchrun's environment variable."""
    variable: str  # PET_NNODES
    flags: Tuple[str, ...]  # ("--nnodes",)
    text: str

    def named_in(self, message: str) -> bool:
        return any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", message)
                   for flag in self.flags if flag.startswith("--"))


def parse_with_torchrun_env(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                            environ: Mapping[str, str]):
    """Parse argv; each torchrun flag it leaves out comes from $PET_<FLAG> when that is set and not
    empty, else has its default. Returns (args, the EnvFlags used).

    Raises:
        UsageError: a bad flag, or a PET_ value its flag would refuse (the message names the
            variable).
    """
    actions = [a for a in parser._actions if a.dest in TORCHRUN_ENV_FLAGS]
    defaults = {a.dest: a.default for a in actions}
    parser.set_defaults(**dict.fromkeys(defaults, _FROM_COMMAND_LINE_OR_ENV))
    try:
        args = parser.parse_args(argv)
    finally:
        parser.set_defaults(**defaults)
    used = []
    for action in actions:
        if getattr(args, action.dest) is not _FROM_COMMAND_LINE_OR_ENV:
            continue
        variable = TORCHRUN_ENV_PREFIX + action.dest.upper()
        text = environ.get(variable, "").strip()
        if not text:
            setattr(args, action.dest, defaults[action.dest])
            continue
        setattr(args, action.dest, _env_value(parser, action, variable, text))
        used.append(EnvFlag(variable, tuple(action.option_strings), text))
    return args, tuple(used)


def _env_value(parser, action: argparse.Action, variable: str, text: str):
    """text converted as the command line would convert it; refused as it would be."""
    flags = "/".join(action.option_strings)
    hint = f"; run `{parser.prog} --help` to see the flags"
    if action.nargs == 0:  # a switch: torchrun reads 1 or 0
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise UsageError(f"{variable}={text!r}: expected 1 or 0 (as torchrun) for "
                         f"{action.option_strings[-1]}")
    value = text
    if action.type is not None:
        try:
            value = action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            name = getattr(action.type, "__name__", repr(action.type))
            raise UsageError(f"{variable}: argument {flags}: invalid {name} value: "
                             f"{text!r}{hint}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise UsageError(f"{variable}: argument {flags}: invalid choice: {text!r} (choose from "
                         f"{choices}){hint}")
    return value


def blame_env(message: str, used: Sequence[EnvFlag]) -> str:
    """A flag's error message, prefixed with the PET_ variables of the flags it names."""
    variables = [u.variable for u in used if u.named_in(message)]
    return f"{', '.join(variables)}: {message}" if variables else message
