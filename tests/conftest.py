"""Fixtures shared by every test: one etcd for the session, a run id per test, and a directory
of the session where agents record their jobs (not the user's home)."""
import os
import uuid

import pytest

from rendezvous.embedded import EmbeddedEtcd


@pytest.fixture(scope="session")
def etcd_endpoint():
    """"host:port" of an etcd started once for the whole session; tests keep apart by run_id."""
    with EmbeddedEtcd() as etcd:
        yield etcd.endpoint


@pytest.fixture
def run_id():
    return "test-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session", autouse=True)
def jobs_dir(tmp_path_factory):
    """Agents started by the tests record their jobs here (rendezvous.registry)."""
    path = tmp_path_factory.mktemp("jobs")
    previous = os.environ.get("ELASTIC_JOBS_DIR")
    os.environ["ELASTIC_JOBS_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["ELASTIC_JOBS_DIR"]
    else:
        os.environ["ELASTIC_JOBS_DIR"] = previous


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that started agents reports the end of each agent's output."""
    from tests.integration import agents
    if call.when == "setup":
        agents.STARTED.clear()
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("call", "teardown"):
        for agent in agents.STARTED:
            report.sections.append((f"agent {agent.name} (pid {agent.proc.pid}, exit "
                                    f"{agent.proc.poll()})", agent.output_tail()))
