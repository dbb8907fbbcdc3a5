"""torchrun's PET_<FLAG> variables (Kubeflow's PyTorchJob sets them): a torchrun flag left off the
command line is read from its variable; parse-level only, no processes."""
import argparse
import sys

import pytest

from elastic.cli import UsageError, parse_args
from elastic.flags import TORCHRUN_ENV_FLAGS, build_parser, parse_with_torchrun_env


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("")
    return str(path)


def test_the_variables_are_torchruns_own():
    """The flags read from PET_* are exactly those torchrun reads (its env/check_env actions)."""
    run = pytest.importorskip("torch.distributed.run")
    from torch.distributed.argparse_util import check_env, env

    torchrun = {a.dest for a in run.get_args_parser()._actions if isinstance(a, (env, check_env))}
    assert TORCHRUN_ENV_FLAGS == torchrun
    ours = {a.dest for a in build_parser()._actions}
    assert TORCHRUN_ENV_FLAGS <= ours


def test_a_pytorchjob_elastic_environment(script):
    environ = {"PET_NNODES": "2:4", "PET_NPROC_PER_NODE": "3", "PET_RDZV_BACKEND": "etcd",
               "PET_RDZV_ENDPOINT": "job-etcd:2379", "PET_RDZV_ID": "job",
               "PET_MAX_RESTARTS": "5", "PET_RDZV_CONF": "join_timeout=30",
               "PET_MONITOR_INTERVAL": "0.5"}
    cfg = parse_args([script, "--lr", "1"], environ)
    assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc) == (2, 4, 3)
    assert cfg.endpoint == "job-etcd:2379" and cfg.run_id == "job"
    assert cfg.max_restarts == 5 and cfg.monitor_interval == 0.5
    assert cfg.rdzv_conf["join_timeout"] == 30.0
    assert cfg.argv == (sys.executable, "-u", script, "--lr", "1")
    [note] = [n for n in cfg.notes if "PET_" in n]
    assert "PET_NNODES=2:4" in note and "PET_RDZV_ENDPOINT=job-etcd:2379" in note


def test_a_pytorchjob_static_environment(script):
    """Without an elastic policy the operator sets torchrun's static rendezvous variables."""
    environ = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-master-0",
               "PET_MASTER_PORT": "23456", "PET_NPROC_PER_NODE": "1"}
    cfg = parse_args([script], environ)
    assert cfg.rendezvous.backend == "static"
    assert cfg.rendezvous.endpoint == ("job-master-0", 23456)
    assert cfg.rendezvous.hosting == "join" and cfg.node_rank == 1


def test_the_command_line_wins(script):
    environ = {"PET_NNODES": "2:4", "PET_MAX_RESTARTS": "bad", "PET_RDZV_ID": "from-env"}
    cfg = parse_args(["--nnodes", "1:3", "--max_restarts", "1", script], environ)
    assert (cfg.min_nodes, cfg.max_nodes, cfg.max_restarts) == (1, 3, 1)
    assert cfg.run_id == "from-env"
    [note] = [n for n in cfg.notes if "PET_" in n]
    assert "PET_NNODES" not in note and "PET_MAX_RESTARTS" not in note


def test_empty_or_missing_variables_leave_the_defaults(script):
    cfg = parse_args([script], {"PET_NNODES": "", "PET_RDZV_ENDPOINT": "  "})
    assert (cfg.min_nodes, cfg.max_nodes, cfg.endpoint) == (1, 1, None)
    assert not any("PET_" in n for n in cfg.notes)
    args, used = parse_with_torchrun_env(build_parser(), ["x"], {})
    assert used == () and args.max_restarts == 0 and args.virtual_local_rank is None


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("true", True),
                                             ("False", False)])
def test_switches_read_one_or_zero(value, expected):
    args, _ = parse_with_torchrun_env(build_parser(), ["x"], {"PET_STANDALONE": value,
                                                              "PET_NO_PYTHON": value})
    assert args.standalone is expected and args.no_python is expected


def test_a_switch_on_the_command_line_wins_over_zero():
    args, used = parse_with_torchrun_env(build_parser(), ["-m", "x"], {"PET_MODULE": "0"})
    assert args.module is True and used == ()


def test_help_still_shows_the_real_defaults():
    parser = build_parser()
    parse_with_torchrun_env(parser, ["x"], {"PET_NNODES": "3"})
    assert parser.get_default("nnodes") == "1:1"


@pytest.mark.parametrize("environ, words", [
    ({"PET_MAX_RESTARTS": "x"},
     "PET_MAX_RESTARTS: argument --max-restarts/--max_restarts: invalid int value: 'x'"),
    ({"PET_MASTER_PORT": "http"}, "PET_MASTER_PORT: argument --master-port/--master_port: "
                                  "invalid int value"),
    ({"PET_RDZV_BACKEND": "zookeeper"}, "PET_RDZV_BACKEND: argument --rdzv-backend/"
                                        "--rdzv_backend: invalid choice: 'zookeeper'"),
    ({"PET_STANDALONE": "maybe"}, "PET_STANDALONE='maybe': expected 1 or 0"),
    ({"PET_NNODES": "a:b"}, "PET_NNODES: --nnodes 'a:b' is not N or MIN:MAX"),
    ({"PET_NNODES": "3:1"}, "PET_NNODES: --nnodes 3:1: MIN is larger than MAX"),
    ({"PET_NPROC_PER_NODE": "0"}, "PET_NPROC_PER_NODE: --nproc-per-node must be at least 1"),
    ({"PET_MAX_RESTARTS": "-1"}, "PET_MAX_RESTARTS: --max-restarts must not be negative"),
    ({"PET_RDZV_CONF": "nope=1"}, "PET_RDZV_CONF: --rdzv-conf 'nope=1'"),
    ({"PET_RDZV_ENDPOINT": "h:2379", "PET_STANDALONE": "1"},
     "PET_RDZV_ENDPOINT, PET_STANDALONE: --standalone starts its own etcd"),
])
def test_a_bad_value_names_its_variable(script, environ, words):
    with pytest.raises(UsageError) as exc:
        parse_args([script], environ)
    message = str(exc.value)
    assert message.startswith(words) and "\n" not in message


def test_a_bad_flag_is_not_blamed_on_the_environment(script):
    with pytest.raises(UsageError) as exc:
        parse_args(["--nnodes", "0", script], {"PET_MAX_RESTARTS": "2"})
    assert str(exc.value).startswith("--nnodes 0: the minimum must be at least 1")


def test_our_own_flags_are_not_read_from_pet_variables(script):
    cfg = parse_args([script], {"PET_GRACE_PERIOD": "99", "PET_HANG_TIMEOUT": "3",
                                "PET_LOGS_SPECS": "x"})
    assert cfg.grace_period == 5.0 and cfg.hang_timeout is None


def test_the_parser_is_left_as_it_was():
    parser = build_parser()
    with pytest.raises(UsageError):
        parse_with_torchrun_env(parser, ["--nnodes"], {})
    assert parser.get_default("standalone") is False
    assert isinstance(parser, argparse.ArgumentParser)
