"""Command-line parsing of `python -m elastic.run` (no processes, no etcd)."""
import os
import sys

import pytest

from elastic.cli import UsageError, parse_args, parse_nnodes, parse_rdzv_conf


@pytest.mark.parametrize("text, expected", [("1", (1, 1)), ("2:4", (2, 4)), ("3:3", (3, 3))])
def test_nnodes(text, expected):
    assert parse_nnodes(text) == expected


@pytest.mark.parametrize("text, words", [
    ("3:1", "write it as 1:3"), ("0:2", "at least 1"), ("a", "not N or MIN:MAX"),
    ("1:2:3", "not N or MIN:MAX"),
])
def test_bad_nnodes(text, words):
    with pytest.raises(UsageError, match=words):
        parse_nnodes(text)


def test_rdzv_conf():
    assert parse_rdzv_conf("join_timeout=5, last_call_timeout=0.5") == {
        "join_timeout": 5.0, "last_call_timeout": 0.5}
    assert parse_rdzv_conf("") == {}
    with pytest.raises(UsageError, match="KEY one of"):
        parse_rdzv_conf("no_such_key=3")
    # torchrun's spellings: timeout is our join_timeout; its own keys are not ours.
    assert parse_rdzv_conf("timeout=3,is_host=1,read_timeout=60") == {"join_timeout": 3.0}
    with pytest.raises(UsageError, match="must not be negative"):
        parse_rdzv_conf("lease_ttl=-1")


def test_script_arguments_pass_through(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    cfg = parse_args(["--nnodes", "1:3", "--nproc_per_node", "2", "--rdzv-endpoint",
                      "etcd://10.0.0.1:2379", str(script), "--lr", "0.1", "--nnodes", "9"])
    assert cfg.argv == (sys.executable, "-u", str(script), "--lr", "0.1", "--nnodes", "9")
    assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc) == (1, 3, 2)
    assert cfg.endpoint == "10.0.0.1:2379"


def test_module_and_no_python():
    assert parse_args(["-m", "json.tool", "x"]).argv == (sys.executable, "-u", "-m", "json.tool", "x")
    assert parse_args(["--no-python", "true"]).argv == ("true",)
    with pytest.raises(UsageError, match="cannot be used together"):
        parse_args(["-m", "--no-python", "true"])


def test_standalone_with_endpoint_is_refused(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("")
    with pytest.raises(UsageError, match="--standalone"):
        parse_args(["--standalone", "--rdzv-endpoint", "127.0.0.1:2379", str(script)])


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("")
    return str(path)


def test_a_missing_module_fails_before_anything_starts_and_names_it():
    with pytest.raises(UsageError, match="module 'no_such_module' .-m. not found"):
        parse_args(["-m", "no_such_module"])
    with pytest.raises(UsageError, match="module 'json.no_such' .-m. not found"):
        parse_args(["-m", "json.no_such"])


def test_a_directory_as_the_script_says_so(tmp_path):
    with pytest.raises(UsageError, match="is a directory .with no __main__.py.; give the script"):
        parse_args([str(tmp_path)])
    (tmp_path / "__main__.py").write_text("")
    assert parse_args([str(tmp_path)]).argv[-1] == str(tmp_path)  # python runs __main__.py


def test_argparse_errors_are_one_line_with_a_hint():
    with pytest.raises(UsageError) as err:
        parse_args(["--no-such-flag", "x.py"])
    assert "unrecognized arguments: --no-such-flag" in str(err.value)
    assert "run `python -m elastic.run --help`" in str(err.value) and "\n" not in str(err.value)


def test_nproc_per_node_as_torchrun(script):
    assert parse_args(["--nproc-per-node", "3", script]).nproc == 3
    cfg = parse_args(["--nproc_per_node", "cpu", script])
    assert cfg.nproc == len(os.sched_getaffinity(0)) and "one per CPU" in cfg.notes[0]
    with pytest.raises(UsageError, match="no CUDA device"):
        parse_args(["--nproc-per-node", "gpu", script])  # this machine has no GPU
    with pytest.raises(UsageError, match="at least 1"):
        parse_args(["--nproc-per-node", "0", script])
    with pytest.raises(UsageError, match="give a number, or auto, cpu, gpu or xpu"):
        parse_args(["--nproc-per-node", "many", script])


def test_console_filters_as_torchrun(script):
    cfg = parse_args(["--nproc-per-node", "3", "--local-ranks-filter", "0,2", "--redirects",
                      "0:2", script])
    both = frozenset({"stdout", "stderr"})
    assert cfg.console_quiet == {0: frozenset({"stderr"}), 1: both}
    assert parse_args(["--nproc-per-node", "2", "-r", "3", "--log-dir", "d", script]
                      ).console_quiet == {0: both, 1: both}
    with pytest.raises(UsageError, match="use 0-3"):
        parse_args(["--redirects", "7", script])


def test_role_and_shutdown_timeout(script):
    cfg = parse_args(["--role", "trainer", "--shutdown-timeout", "12", script])
    assert (cfg.role, cfg.grace_period) == ("trainer", 12.0)


def test_ignored_torchrun_flags_are_named_once_in_one_line(script):
    cfg = parse_args(["--start-method", "fork", "--logs-specs", "x", "--rdzv-conf",
                      "read_timeout=60", script])
    [note] = cfg.notes
    assert note.startswith("torchrun options without effect here: --start-method")
    assert "--logs-specs" in note and "--rdzv-conf read_timeout" in note


def test_etcd_security_settings_are_checked_and_a_password_never_taken_from_the_command_line(
        script, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="cacert=/ca.pem: no readable file there"):
        parse_args(["--rdzv-conf", "cacert=/ca.pem", "--rdzv-endpoint", "h:2379", script])
    with pytest.raises(UsageError, match="needs both cert= and key="):
        parse_args(["--rdzv-conf", f"cacert={script},cert={script}", script])
    with pytest.raises(UsageError, match="protocol=https needs cacert="):
        parse_args(["--rdzv-conf", "protocol=https", script])
    with pytest.raises(UsageError, match="set .ELASTIC_ETCD_PASSWORD instead"):
        parse_args(["--rdzv-conf", "user=root,password=secret", script])
    with pytest.raises(UsageError, match="etcd users need TLS"):
        parse_args(["--rdzv-conf", "user=trainer", script])
    monkeypatch.delenv("ELASTIC_ETCD_PASSWORD", raising=False)
    with pytest.raises(UsageError, match="needs a password: set .ELASTIC_ETCD_PASSWORD"):
        parse_args(["--rdzv-conf", f"cacert={script},user=trainer", script])
    monkeypatch.setenv("ELASTIC_ETCD_PASSWORD", "s3cret")
    cfg = parse_args(["--rdzv-conf", f"cacert={script},user=trainer,join_timeout=5", script])
    assert (cfg.security.ca_cert, cfg.security.user, cfg.security.password) == (
        script, "trainer", "s3cret")
    assert cfg.rdzv_conf == {"join_timeout": 5.0}
    assert parse_args([script]).security is None


def test_node_labels(script):
    cfg = parse_args(["--node-label", "capacity-type=spot", "--node-label", "zone=eu-1", script])
    assert cfg.labels == {"capacity-type": "spot", "zone": "eu-1"}
    with pytest.raises(UsageError, match="use spot or on-demand"):
        parse_args(["--node-label", "capacity-type=cheap", script])
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        parse_args(["--node-label", "spot", script])


def test_static_rendezvous_from_master_addr_and_node_rank(script):
    base = ["--nnodes", "2", "--master-addr", "10.1.2.3", "--master-port", "29600"]
    host = parse_args(base + ["--node-rank", "0", script])
    assert host.rendezvous.backend == "static" and host.rendezvous.hosting == "host"
    assert host.endpoint == "10.1.2.3:29600" and host.master_port is None
    assert host.node_rank == 0 and host.rdzv_conf["connect_timeout"] == 60.0
    other = parse_args(base + ["--node-rank", "1", script])
    assert other.rendezvous.hosting == "join" and other.endpoint == "10.1.2.3:29600"
    # torchrun's defaults: 127.0.0.1:29500
    assert parse_args(["--nnodes", "2", "--node-rank", "1", script]).endpoint == "127.0.0.1:29500"
    # One node, nothing given: the embedded etcd on a free port, whatever the backend says.
    single = parse_args(["--rdzv-backend", "static", script])
    assert single.endpoint is None and single.rendezvous.hosting is None


def test_c10d_rendezvous_is_hosted_by_the_endpoints_host(script):
    cfg = parse_args(["--nnodes", "1:4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0",
                      script])
    assert cfg.endpoint == "node0:29400" and cfg.rendezvous.hosting == "auto"
    explicit = parse_args(["--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:1234",
                           "--rdzv_conf", "is_host=false", script])
    assert explicit.endpoint == "node0:1234" and explicit.rendezvous.hosting == "join"
    etcd = parse_args(["--rdzv-backend", "etcd-v2", "--rdzv-endpoint", "e:2379",
                       "--master-addr", "x", script])
    assert etcd.rendezvous.hosting is None and "--master-addr is used by a static" in etcd.notes[0]


def test_role_reaches_the_workers_as_role_name():
    from launcher.workers import WorkerSpec, WorldAssignment, worker_env

    spec = WorkerSpec(argv=("x",), nproc=1, role="trainer")
    a = WorldAssignment(run_id="j", round=1, group_rank=0, group_world_size=1, rank_offset=0,
                        world_size=1, master_addr="127.0.0.1", master_port=1, restart_count=0,
                        max_restarts=0)
    assert worker_env({}, spec, a, 0)["ROLE_NAME"] == "trainer"
