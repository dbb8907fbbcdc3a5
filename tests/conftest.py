"""Fixtures shared by every test: one etcd for the session, and a run id per test."""
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
