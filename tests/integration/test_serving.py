"""Endpoints on a real Ray Serve (a `ray.cluster_utils.Cluster` on 127.0.0.1 for the module): a
load step scales up and the extra replicas go after it; scale to zero and a cold start lose no
request; an endpoint never runs more than its max."""
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest

from .agents import REPO, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.ray]
ray = pytest.importorskip("ray", reason="the serving tests need Ray: pip install 'elastic-run[ray]'")
pytest.importorskip("ray.serve", reason="the serving tests need Ray Serve: pip install "
                                        "'elastic-run[ray]'")

PORT = 18123


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    ray.init(address=c.address, namespace="serving", logging_level="ERROR", log_to_driver=False)
    yield c
    from ray import serve
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def call(url, work_s=0.0, timeout=30):
    body = json.dumps({"inputs": [[0.1] * 8], "work_s": work_s}).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Load:
    """`clients` threads calling the endpoint back to back; every failure is kept."""

    def __init__(self, url, clients, work_s):
        self.url, self.work_s, self.ok, self.failed = url, work_s, 0, []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                call(self.url, self.work_s)
                self.ok += 1
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self.failed.append(repr(exc))

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join(60)


def running(name):
    from serving import endpoint
    return endpoint.status(name)["running"]


def test_a_load_step_scales_up_within_seconds_and_the_extra_replicas_go_after(cluster):
    from serving import endpoint
    from serving.spec import EndpointSpec
    spec = EndpointSpec("step", "examples.serve_model:Model", min_replicas=1, max_replicas=3,
                        target_concurrency=2, cpus=0.5, stable_window_s=8, panic_window_s=2)
    url = endpoint.deploy(spec, http_port=PORT, path=str(REPO))
    assert call(url)["outputs"] and running("step") == 1
    load = Load(url, clients=8, work_s=0.2)
    seen = []
    try:
        wait_for(lambda: seen.append(running("step")) or seen[-1] == 3, 60,
                 what="three replicas under the load")
    finally:
        load.stop()
    assert load.failed == [] and load.ok > 0
    wait_for(lambda: seen.append(running("step")) or seen[-1] == 1, 90,
             what="back to one replica after the load")
    assert max(seen) == 3  # never above max, though 8 clients ask for 4
    endpoint.delete("step")


def test_scale_to_zero_and_a_cold_start_lose_no_request(cluster):
    from serving import endpoint
    from serving.spec import EndpointSpec
    spec = EndpointSpec("cold", "examples.serve_model:Model", min_replicas=0, max_replicas=2,
                        target_concurrency=2, cpus=0.5, idle_s=3, stable_window_s=4,
                        panic_window_s=1)
    url = endpoint.deploy(spec, http_port=PORT, path=str(REPO))
    assert call(url, timeout=60)["outputs"]  # the first request starts the first replica
    wait_for(lambda: running("cold") == 0, 60, what="scaled to zero")
    started = time.time()
    answers = [None] * 4

    def one(i):
        answers[i] = call(url, timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(a and a["outputs"] for a in answers), answers  # held until a replica was up
    print(f"cold start answered in {time.time() - started:.1f} s")
    endpoint.delete("cold")


def test_bad_specs_fail_in_one_line_before_ray_is_contacted():
    import subprocess
    import sys
    for args, message in ((["--min", "3", "--max", "2"], "max replicas (2) must be >= 1"),
                          (["--target-concurrency", "0"], "target concurrency must be > 0")):
        out = subprocess.run([sys.executable, "-m", "serving", "deploy",
                              "examples.serve_model:Model", "--name", "m", "--address",
                              "127.0.0.1:1", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1
    out = subprocess.run([sys.executable, "-m", "serving", "deploy", "nope:Model", "--name", "m",
                          "--address", "127.0.0.1:1"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "cannot import 'nope'" in out.stderr


def test_beyond_the_routers_queue_a_request_gets_503_with_retry_after(cluster):
    from serving import endpoint
    from serving.spec import EndpointSpec
    spec = EndpointSpec("full", "examples.serve_model:Model", min_replicas=1, max_replicas=1,
                        max_concurrency=1, max_queued=1, cpus=0.5)
    url = endpoint.deploy(spec, http_port=PORT, path=str(REPO))
    codes, retry = [], []

    def one():
        try:
            call(url, work_s=2.0)
            codes.append(200)
        except urllib.error.HTTPError as exc:
            codes.append(exc.code)
            retry.append(exc.headers.get("Retry-After"))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert codes.count(200) >= 2 and codes.count(503) >= 1, codes  # one running, one queued
    assert set(retry) == {"1"}
    endpoint.delete("full")


def test_an_update_rolls_out_without_losing_a_request(cluster):
    from serving import endpoint
    from serving.spec import EndpointSpec
    spec = EndpointSpec("roll", "examples.serve_model:Model", min_replicas=2, max_replicas=2,
                        cpus=0.5)
    url = endpoint.deploy(spec, http_port=PORT, path=str(REPO))
    load = Load(url, clients=4, work_s=0.05)
    try:
        time.sleep(2)
        before = load.ok
        assert endpoint.update("roll", http_port=PORT).version == "2"  # once it runs
        time.sleep(2)
    finally:
        load.stop()
    assert load.failed == [] and load.ok > before > 0
    assert endpoint.status("roll")["running"] == 2
    endpoint.delete("roll")


def test_a_plain_model_serves_its_max_concurrency_at_once(cluster):
    from serving import endpoint
    from serving.spec import EndpointSpec
    spec = EndpointSpec("wide", "examples.serve_model:Model", min_replicas=1, max_replicas=1,
                        max_concurrency=4, cpus=0.5)
    url = endpoint.deploy(spec, http_port=PORT, path=str(REPO))
    call(url)
    started = time.time()
    threads = [threading.Thread(target=call, args=(url, 1.0)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # four 1 s requests on one replica at once: about 1 s, not 4 (a sync model on a thread)
    assert time.time() - started < 2.5
    endpoint.delete("wide")


def test_scale_changes_the_bounds_of_a_running_endpoint(cluster):
    import subprocess
    import sys
    from serving import endpoint
    from serving.spec import EndpointSpec
    spec = EndpointSpec("bounds", "examples.serve_model:Model", min_replicas=1, max_replicas=2,
                        cpus=0.5)
    url = endpoint.deploy(spec, http_port=PORT, path=str(REPO))
    call(url)
    out = subprocess.run([sys.executable, "-m", "serving", "scale", "bounds", "--min", "2",
                          "--address", "auto", "--http-port", str(PORT), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_ADDRESS": cluster.address})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["min_replicas"] == 2
    wait_for(lambda: running("bounds") == 2, 60, what="two replicas after scale --min 2")
    bad = subprocess.run([sys.executable, "-m", "serving", "scale", "bounds", "--min", "3",
                          "--address", "auto", "--http-port", str(PORT)], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_ADDRESS": cluster.address})
    assert bad.returncode == 2 and "max replicas (2) must be >= 1 and >= min (3)" in bad.stderr
    assert running("bounds") == 2
    endpoint.delete("bounds")


def test_the_policy_asks_the_pool_and_serve_runs_only_what_it_grants():
    """The handshake's Serve side against a real etcd (no Ray needed): the ask is written at
    once, the grant read back; Serve runs min(asked, granted); etcd gone keeps the last grant."""
    from integrations.ray.store import RUNNING, PoolStore, Record
    from rendezvous.embedded import EmbeddedEtcd
    from serving.pool import Grant
    clock = [0.0]
    with EmbeddedEtcd() as etcd:
        store = PoolStore(etcd.endpoint)
        grant = Grant(etcd.endpoint, "ep", clock=lambda: clock[0])
        assert grant(3) == 0  # nothing granted yet: Serve starts nothing
        assert store.replicas() == {"ep": 3}
        store.put_record("ep", Record(state=RUNNING, members=({"id": "ep/0"}, {"id": "ep/1"})))
        assert grant(3) == 0  # read again only after READ_EVERY_S...
        clock[0] += 1
        assert grant(3) == 2  # ...then two of the three
        assert grant(1) == 1  # fewer wanted: at once, and the pool is told
        assert store.replicas() == {"ep": 1}
        store.close()
    clock[0] += 1
    assert grant(4) == 2 and grant(1) == 1  # etcd gone: the last grant holds, nothing raised
