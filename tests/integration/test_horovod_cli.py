"""`--backend horovod` and Horovod's host discovery where Horovod itself is not needed: these
run whether or not Horovod is installed."""
import os
import subprocess
import sys

import pytest

from tests.support import HOROVOD_INSTALL

from .agents import REPO

pytestmark = pytest.mark.integration

SCRIPTS = REPO / "tests" / "integration" / "scripts"


def discover(endpoint, run_id, timeout=5):
    return subprocess.run(
        [sys.executable, "-m", "integrations.horovod.discover", "--rdzv-endpoint", endpoint,
         "--rdzv-id", run_id, "--timeout", str(timeout)],
        cwd=REPO, capture_output=True, text=True, timeout=60)


def test_backend_horovod_without_horovod_says_how_to_install_it(tmp_path):
    stub = tmp_path / "stub" / "horovod"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('simulated: no horovod here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub.parent), str(REPO)]))
    done = subprocess.run([sys.executable, "-m", "elastic.run", "--backend", "horovod",
                           SCRIPTS / "hvd_static.py"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and HOROVOD_INSTALL in errors[0] and "simulated" in errors[0], done.stderr


def test_discover_prints_nothing_for_an_empty_job_and_one_line_when_etcd_is_down(
        etcd_endpoint, run_id):
    found = discover(etcd_endpoint, run_id)
    assert (found.returncode, found.stdout, found.stderr) == (0, "", "")
    down = discover("127.0.0.1:1", run_id, timeout=1)
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.count("\n") == 1 and down.stderr.startswith("error: etcd at 127.0.0.1:1")
