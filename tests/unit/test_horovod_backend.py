"""`--backend horovod` settings and the Horovod worker runner's command line (no processes)."""
import sys

import pytest

from elastic.cli import UsageError, parse_args
from integrations.horovod.prewarm import runner_argv
from launcher.agent import AgentConfig
from launcher.workers import WorkerSpec
from rendezvous.api import RendezvousSettings


@pytest.mark.parametrize("extra, words", [
    (["--rescale-mode", "in-place"], "cannot be forced"),
    (["--hang-timeout", "5"], "do not report it"),
])
def test_settings_horovod_workers_cannot_honour_are_refused(extra, words):
    with pytest.raises(UsageError, match=words):
        parse_args(["--backend", "horovod", *extra, __file__])


def test_the_default_backend_is_torch():
    assert parse_args([__file__]).backend == "torch"


def agent_config(**kwargs):
    return AgentConfig(settings=RendezvousSettings(run_id="r"),
                       workers=WorkerSpec(argv=("x",), nproc=1), host="127.0.0.1", **kwargs)


def test_agent_config_checks_the_backend():
    with pytest.raises(ValueError, match="not one of"):
        agent_config(backend="mxnet")
    with pytest.raises(ValueError, match="hvd.elastic.run"):
        agent_config(backend="horovod", rescale_mode="in-place")


def test_python_workers_run_through_the_prewarm_runner():
    py = sys.executable
    assert runner_argv((py, "-u", "train.py", "--lr", "1")) == (
        py, "-u", "-m", "integrations.horovod.prewarm", "train.py", "--lr", "1")
    assert runner_argv((py, "-u", "-m", "pkg.train")) == (
        py, "-u", "-m", "integrations.horovod.prewarm", "-m", "pkg.train")
    assert runner_argv(("./train.sh", "-u")) is None  # --no-python: nothing to pre-warm
