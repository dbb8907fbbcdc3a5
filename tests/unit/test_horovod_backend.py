"""`--backend horovod` settings and the Horovod worker runner's command line (no processes)."""
import sys

import pytest

from elastic.cli import UsageError, parse_args
from elastic.run import worker_backend
from integrations.horovod.prewarm import runner_argv
from launcher.backend import BackendTraits, ProcessBackend
from launcher.inplace import InPlaceBackend
from launcher.workers import WorkerSpec


@pytest.mark.parametrize("extra, words", [
    (["--rescale-mode", "in-place"], "cannot be forced"),
    (["--hang-timeout", "5"], "do not report it"),
])
def test_settings_horovod_workers_cannot_honour_are_refused(extra, words):
    with pytest.raises(UsageError, match=words):
        parse_args(["--backend", "horovod", *extra, __file__])


def test_the_default_backend_is_torch():
    assert parse_args([__file__]).backend == "torch"


def test_the_command_line_chooses_the_worker_backend(tmp_path):
    """Where the command line becomes an agent, the backend is chosen once; the agent only sees
    its traits."""
    spec = WorkerSpec(argv=("x",), nproc=1)
    wake = lambda: None  # noqa: E731
    made = []
    try:
        for mode, kind, traits in [
            ("restart", ProcessBackend, BackendTraits()),
            ("auto", InPlaceBackend, BackendTraits(
                in_place=True, standby_after_world=True, holds_for_hello=True,
                prewarm="if-job-in-place", reports_progress=True)),
            ("in-place", InPlaceBackend, BackendTraits(
                in_place=True, standby_after_world=True, holds_for_hello=False,
                prewarm="always", reports_progress=True)),
        ]:
            config = parse_args(["--rescale-mode", mode, __file__])
            factory, closers = worker_backend(config, store=None, host="127.0.0.1")
            made += closers
            backend = factory(spec, "node-a", wake)
            made.append(backend.close)
            assert type(backend) is kind and backend.traits == traits, mode
            # Under the torch backend a Horovod script is caught by the guard's address.
            assert "HOROVOD_GLOO_RENDEZVOUS_PORT" in backend.spec.extra_env
    finally:
        for close in made:
            close()


def test_python_workers_run_through_the_prewarm_runner():
    py = sys.executable
    assert runner_argv((py, "-u", "train.py", "--lr", "1")) == (
        py, "-u", "-m", "integrations.horovod.prewarm", "train.py", "--lr", "1")
    assert runner_argv((py, "-u", "-m", "pkg.train")) == (
        py, "-u", "-m", "integrations.horovod.prewarm", "-m", "pkg.train")
    assert runner_argv(("./train.sh", "-u")) is None  # --no-python: nothing to pre-warm
