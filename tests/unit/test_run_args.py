"""Command-line parsing of `python -m elastic.run` (no processes, no etcd)."""
import sys

import pytest

from elastic.run import UsageError, parse_args, parse_nnodes, parse_rdzv_conf


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
        parse_rdzv_conf("timeout=3")
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
    assert parse_args(["-m", "pkg.train", "x"]).argv == (sys.executable, "-u", "-m", "pkg.train", "x")
    assert parse_args(["--no-python", "true"]).argv == ("true",)
    with pytest.raises(UsageError, match="cannot be used together"):
        parse_args(["-m", "--no-python", "true"])


def test_standalone_with_endpoint_is_refused(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("")
    with pytest.raises(UsageError, match="--standalone"):
        parse_args(["--standalone", "--rdzv-endpoint", "127.0.0.1:2379", str(script)])
