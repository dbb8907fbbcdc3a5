"""The command line of `python -m elastic.run`, parsed and checked once into a `RunConfig`.

Every problem is a `UsageError` whose one-line message says what to do; nothing has started yet.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

from elastic.flags import (RDZV_CONF_KEYS, EnvFlag, UsageError, blame_env, build_parser,
                           parse_with_torchrun_env)
from elastic.torchrun_compat import (IGNORED_CONF, SECURITY_CONF, CompatError, RendezvousPlan,
                                     console_quiet, ignored_note, parse_bool, rendezvous_plan,
                                     resolve_nproc)

HOSTED_CONNECT_TIMEOUT_S = 60.0  # joining a rendezvous that another node starts: wait for it


@dataclass(frozen=True)
class RunConfig:
    min_nodes: int
    max_nodes: int
    nproc: int
    endpoint: Optional[str]
    run_id: str
    rdzv_conf: dict
    max_restarts: int
    monitor_interval: float
    log_dir: Optional[str]
    local_addr: Optional[str]
    master_port: Optional[int]
    grace_period: float
    argv: Tuple[str, ...]
    batch_policy: object = None  # elastic.policy.BatchPolicy
    rescale_mode: str = "auto"
    hang_timeout: Optional[float] = None
    notices: object = None  # launcher.preemption.NoticeConfig
    backend: str = "torch"
    rendezvous: RendezvousPlan = RendezvousPlan(None)
    node_rank: Optional[int] = None
    role: str = "default"
    console_quiet: Mapping[int, FrozenSet[str]] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()  # said once at start: what torchrun flags did and did not do
    labels: Mapping[str, str] = field(default_factory=dict)
    stay_as_spare: bool = False
    retention_s: float = 86400.0
    security: object = None  # rendezvous.connect.EtcdSecurity, or None
    preload: Tuple[str, ...] = ()  # modules of the node's zygote; () for none
    gpus: object = None  # launcher.devices.GpuRequest
    gpu_probe: str = "nvml"  # --gpu-probe: nvml, fake:PATH or none


def parse_nnodes(text: str) -> Tuple[int, int]:
    parts = text.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--nnodes {text!r} is not N or MIN:MAX (for example 2 or 1:4)") from None
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2:
        raise UsageError(f"--nnodes {text!r} is not N or MIN:MAX (for example 2 or 1:4)")
    low, high = numbers
    if low < 1:
        raise UsageError(f"--nnodes {text}: the minimum must be at least 1")
    if low > high:
        raise UsageError(f"--nnodes {text}: MIN is larger than MAX; write it as {high}:{low}")
    return low, high


def parse_rdzv_conf(text: str) -> dict:
    """Our rendezvous settings from --rdzv-conf; torchrun's own keys are read by
    `torchrun_conf` (torchrun's `timeout` is our join_timeout)."""
    conf = {}
    for key, value in _conf_items(text):
        if key == "timeout":
            key = "join_timeout"
        if key in IGNORED_CONF or key in SECURITY_CONF or key == "is_host":
            continue
        try:
            conf[key] = RDZV_CONF_KEYS[key](value)
        except ValueError:
            raise UsageError(f"--rdzv-conf {key}={value!r} is not a number") from None
        if conf[key] < 0:
            raise UsageError(f"--rdzv-conf {key} must not be negative")
    return conf


def torchrun_conf(text: str) -> Tuple[Optional[bool], Dict[str, str]]:
    """(is_host, {ignored key: why}) from torchrun's keys in --rdzv-conf."""
    is_host, ignored = None, {}
    for key, value in _conf_items(text):
        if key == "is_host":
            try:
                is_host = parse_bool(key, value)
            except CompatError as exc:
                raise UsageError(str(exc)) from None
        elif key in IGNORED_CONF:
            ignored[key] = IGNORED_CONF[key]
    return is_host, ignored


def security_conf(text: str):
    """How to reach etcd (TLS, user) from --rdzv-conf, or None for a plain connection.

    Raises:
        UsageError: an incomplete setting (e.g. cert= without key=, protocol=https without
            cacert=), or a file that cannot be read.
    """
    from rendezvous.connect import EtcdSecurity

    conf = dict(_conf_items(text))
    protocol = conf.get("protocol", "").lower()
    if protocol not in ("", "http", "https"):
        raise UsageError(f"--rdzv-conf protocol={protocol!r}: use http or https")
    if protocol == "https" and "cacert" not in conf:
        raise UsageError("--rdzv-conf protocol=https needs cacert=FILE (the CA that signed "
                         "etcd's certificate)")
    try:
        return EtcdSecurity.from_settings(ca_cert=conf.get("cacert"), cert=conf.get("cert"),
                                          key=conf.get("key"), user=conf.get("user"))
    except ValueError as exc:
        raise UsageError(f"--rdzv-conf: {exc}") from None


def parse_labels(items) -> Dict[str, str]:
    """--node-label KEY=VALUE, repeated."""
    labels = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--node-label {item!r}: expected KEY=VALUE, e.g. capacity-type=spot")
        labels[key.strip()] = value.strip()
    kind = labels.get("capacity-type")
    if kind is not None and kind not in ("spot", "on-demand"):
        raise UsageError(f"--node-label capacity-type={kind}: use spot or on-demand")
    return labels


def _conf_items(text: str):
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key == "password":
            raise UsageError("--rdzv-conf password=: a password on the command line is visible to "
                             "every user of the machine; set $ELASTIC_ETCD_PASSWORD instead")
        known = (key in RDZV_CONF_KEYS or key in IGNORED_CONF or key in SECURITY_CONF
                 or key in ("timeout", "is_host"))
        if not sep or not known:
            keys = ", ".join(sorted(RDZV_CONF_KEYS))
            raise UsageError(f"--rdzv-conf {item!r}: expected KEY=VALUE with KEY one of {keys}")
        yield key, value.strip()


def _worker_argv(args) -> Tuple[str, ...]:
    if args.module and args.no_python:
        raise UsageError("--module and --no-python cannot be used together")
    if args.no_python:
        if shutil.which(args.script) is None:
            raise UsageError(f"executable {args.script!r} not found on PATH or not executable")
        return (args.script, *args.script_args)
    if args.module:
        _check_module(args.script)
        return (sys.executable, "-u", "-m", args.script, *args.script_args)
    if os.path.isdir(args.script):
        if not os.path.isfile(os.path.join(args.script, "__main__.py")):
            raise UsageError(f"training script {args.script!r} is a directory (with no "
                             "__main__.py); give the script file in it, e.g. "
                             f"{os.path.join(args.script, 'train.py')}")
    elif not os.path.isfile(args.script):
        raise UsageError(f"training script {args.script!r} not found (working directory "
                         f"{os.getcwd()}); check the path")
    return (sys.executable, "-u", args.script, *args.script_args)


def _check_module(name: str) -> None:
    """-m NAME must be importable by the workers (python -m puts the working directory first on
    the path), so that a typo fails here, before etcd and workers start."""
    sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    finally:
        sys.path.pop(0)
    if not found:
        raise UsageError(f"module {name!r} (-m) not found from the working directory "
                         f"{os.getcwd()} or the Python path; check its name, or run from the "
                         "directory that contains it")


def parse_args(argv: Optional[List[str]] = None,
               environ: Optional[Mapping[str, str]] = None) -> RunConfig:
    """The command line (torchrun's flags left out of it read from $PET_<FLAG>, as torchrun
    does; environ defaults to os.environ) checked into a RunConfig."""
    environ = os.environ if environ is None else environ
    args, from_env = parse_with_torchrun_env(build_parser(), argv, environ)
    try:
        return _config(args, from_env, environ)
    except UsageError as exc:
        raise UsageError(blame_env(str(exc), from_env)) from None


def _config(args, from_env: Tuple[EnvFlag, ...], environ: Mapping[str, str]) -> RunConfig:
    low, high = parse_nnodes(args.nnodes)
    try:
        nproc, nproc_note = resolve_nproc(args.nproc_per_node)
        quiet = console_quiet(nproc, args.redirects, args.local_ranks_filter)
    except CompatError as exc:
        raise UsageError(str(exc)) from None
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts must not be negative, got {args.max_restarts}")
    if args.hang_timeout is not None and args.hang_timeout <= 0:
        raise UsageError("--hang-timeout must be positive (seconds without progress)")
    if args.hang_timeout is not None and args.rescale_mode == "restart":
        raise UsageError("--hang-timeout watches workers that report progress through the "
                         "in-place API; it cannot work with --rescale-mode restart")
    if args.monitor_interval <= 0:
        raise UsageError("--monitor-interval must be positive")
    if args.standalone and args.rdzv_endpoint:
        raise UsageError("--standalone starts its own etcd; leave out --rdzv-endpoint or --standalone")
    if args.rdzv_id in ("", ".") or "/" in args.rdzv_id:
        raise UsageError(f"--rdzv-id {args.rdzv_id!r} must be non-empty and contain no '/'")
    if args.node_rank is not None and args.node_rank < 0:
        raise UsageError(f"--node-rank must not be negative, got {args.node_rank}")
    if args.job_retention < 0:
        raise UsageError(f"--job-retention must not be negative, got {args.job_retention}")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise UsageError(f"--master-port {args.master_port} is not a port number")
    rdzv_conf = parse_rdzv_conf(args.rdzv_conf)
    is_host, ignored_conf = torchrun_conf(args.rdzv_conf)
    plan = _rendezvous(args, high, is_host)
    if plan.hosting is not None and "connect_timeout" not in rdzv_conf:
        rdzv_conf["connect_timeout"] = HOSTED_CONNECT_TIMEOUT_S
    if args.backend == "horovod":
        _check_horovod_backend(args)
    notes = [n for n in (nproc_note, ignored_note(args, ignored_conf)) if n]
    if from_env:
        notes.append("from torchrun's environment variables: "
                     + ", ".join(f"{u.variable}={u.text}" for u in from_env))
    if args.master_addr is not None and plan.backend != "static":
        notes.append(f"--master-addr is used by a static rendezvous only; with {plan.backend} "
                     "the rank-0 store is on the node holding rank 0, at its --local-addr")
    if (args.redirects.strip() not in ("", "0") or args.tee.strip() not in ("", "0")) \
            and not args.log_dir:
        notes.append("--redirects/--tee: log files are written only with --log-dir DIR "
                     "(DIR/round<N>/rank<R>.log)")
    grace = args.shutdown_timeout if args.shutdown_timeout is not None else args.grace_period
    return RunConfig(
        backend=args.backend,
        batch_policy=_batch_policy(args, low, high, nproc), rescale_mode=args.rescale_mode,
        hang_timeout=args.hang_timeout, notices=_notice_config(args),
        min_nodes=low, max_nodes=high, nproc=nproc,
        endpoint=None if plan.endpoint is None else _format(plan.endpoint),
        run_id=args.rdzv_id, rdzv_conf=rdzv_conf,
        max_restarts=args.max_restarts, monitor_interval=args.monitor_interval,
        log_dir=args.log_dir, local_addr=args.local_addr,
        # With a static rendezvous --master-port is the rendezvous's port (as in torchrun,
        # where one store serves both); the rank-0 store then takes a free port.
        master_port=None if plan.backend == "static" and plan.hosting else args.master_port,
        grace_period=grace, argv=_worker_argv(args), rendezvous=plan,
        node_rank=args.node_rank, role=args.role, console_quiet=quiet, notes=tuple(notes),
        labels=parse_labels(args.node_label), stay_as_spare=args.stay_as_spare,
        retention_s=args.job_retention, security=security_conf(args.rdzv_conf),
        preload=parse_preload(args.preload), gpus=_gpu_request(args, environ),
        gpu_probe=_gpu_probe(args.gpu_probe),
    )


def _gpu_request(args, environ: Mapping[str, str]):
    """--gpus-per-proc and --gpu-memory-fraction, within the user's CUDA_VISIBLE_DEVICES."""
    from launcher.devices import DeviceError, GpuRequest

    try:
        return GpuRequest(gpus_per_proc=args.gpus_per_proc,
                          memory_fraction=args.gpu_memory_fraction,
                          visible=environ.get("CUDA_VISIBLE_DEVICES"))
    except DeviceError as exc:
        raise UsageError(str(exc)) from None


def _gpu_probe(spec: str) -> str:
    if spec in ("nvml", "none") or (spec.startswith("fake:") and len(spec) > len("fake:")):
        return spec
    raise UsageError(f"--gpu-probe {spec!r}: use nvml, fake:PATH (states recorded by `python -m "
                     "integrations.nvml record`) or none")


_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_preload(text: str) -> Tuple[str, ...]:
    """--preload: module names, or none."""
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if not _MODULE_NAME.match(n)]
    if bad:
        raise UsageError(f"--preload {text!r}: {', '.join(bad)} is not a module name; give "
                         "comma-separated names such as torch,torch.distributed, or none")
    return names


def _format(endpoint: Tuple[str, int]) -> str:
    from rendezvous.connect import format_endpoint
    return format_endpoint(*endpoint)


def _rendezvous(args, max_nodes: int, is_host: Optional[bool]) -> RendezvousPlan:
    endpoint, has_port = None, False
    if args.rdzv_endpoint:
        from rendezvous.connect import parse_endpoint
        try:
            endpoint = parse_endpoint(args.rdzv_endpoint)
        except ValueError as exc:
            raise UsageError(f"--rdzv-endpoint: {exc}") from None
        has_port = args.rdzv_endpoint.rstrip("/").rsplit("]", 1)[-1].count(":") > 0
    backend = args.rdzv_backend
    if backend is not None and backend.startswith("etcd") and args.master_addr is not None \
            and endpoint is None:
        raise UsageError(f"--rdzv-backend {backend} needs --rdzv-endpoint (the etcd to use); "
                         "--master-addr names a static rendezvous")
    return rendezvous_plan(backend, endpoint, has_port, args.master_addr, args.master_port,
                           args.node_rank, max_nodes, args.standalone, is_host)


def _check_horovod_backend(args) -> None:
    if args.rescale_mode == "in-place":
        raise UsageError("--rescale-mode in-place cannot be forced on Horovod workers: they follow a "
                         "new world in place only through hvd.elastic.run, which auto (the "
                         "default) detects, and they pre-warm anyway")
    if args.hang_timeout is not None:
        raise UsageError("--hang-timeout watches step progress reported through the torch "
                         "in-place API; Horovod workers do not report it")
    from integrations.horovod.agent import require_horovod
    try:
        require_horovod()
    except ImportError as exc:
        raise UsageError(f"--backend horovod: Horovod cannot be imported ({exc}); install it "
                         "with `bash integrations/horovod/install.sh`") from None


def _notice_config(args):
    from launcher.preemption import NoticeConfig

    extra = ()
    if getattr(args, "preemption_k8s", False):
        try:
            from integrations.kubernetes.notice import make_source
            source = make_source()
        except ImportError as exc:
            raise UsageError(f"--preemption-k8s: {exc}") from None
        extra = (source,) if source is not None else ()
    try:
        return NoticeConfig(notice_file=args.preemption_file, metadata_url=args.preemption_url,
                            metadata_preset=args.preemption_preset,
                            poll_interval=args.preemption_poll_interval,
                            default_grace=args.preemption_grace, extra=extra)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _batch_policy(args, min_nodes: int, max_nodes: int, nproc: int):
    """The policy named on the command line, checked against every world this node can be in."""
    from elastic.policy import BatchPolicyError, make_policy

    name = args.batch_policy
    if name is None:
        if args.global_batch_size is None and args.per_worker_batch_size is None:
            return None
        name = "fixed" if args.global_batch_size is not None else "linear"
    smallest = min_nodes * nproc
    try:
        policy = make_policy(
            name, global_batch=args.global_batch_size, per_worker_batch=args.per_worker_batch_size,
            reference_world=args.reference_world_size or smallest,
            max_micro_batch=args.max_micro_batch, warmup_steps=args.lr_warmup_steps)
        for world in range(smallest, max_nodes * nproc + 1, nproc):
            policy.plan(world)
    except BatchPolicyError as exc:
        raise UsageError(str(exc)) from None
    return policy
