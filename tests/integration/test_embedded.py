"""The etcd we own: its process and data dir lifecycle, connecting to it, and `python -m rendezvous`."""
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from rendezvous.api import RendezvousConnectionError
from rendezvous.connect import connect, wait_for_etcd
from rendezvous.embedded import EmbeddedEtcd
from launcher.network import free_port
from tests.support import quiet_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN = 10.0



@pytest.fixture
def busy_port():
    """A port held by a listening socket that accepts nothing and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid, timeout=GONE_WITHIN):
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def python(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True, **kwargs)


def test_start_and_stop_remove_the_process_and_temp_dir(run_id):
    etcd = EmbeddedEtcd()
    endpoint = etcd.start()
    pid, data_dir = etcd.pid, etcd.data_dir
    assert endpoint == etcd.endpoint and endpoint.startswith("127.0.0.1:")
    assert os.path.basename(data_dir).startswith("elastic-etcd-") and os.path.isdir(data_dir)
    client = connect(endpoint)
    client.put(f"{run_id}/k", "v")
    assert client.get(f"{run_id}/k")[0] == b"v"
    client.close()

    etcd.stop()
    assert not os.path.exists(data_dir)
    assert wait_gone(pid, timeout=0.1)  # stop() has already reaped it
    assert etcd.pid is None and not etcd.running
    etcd.stop()  # idempotent


def test_a_given_data_dir_is_kept_and_a_restart_finds_its_keys(tmp_path, run_id):
    data_dir = tmp_path / "etcd-data"
    with EmbeddedEtcd(data_dir=str(data_dir)) as etcd:
        client = connect(etcd.endpoint)
        client.put(f"{run_id}/kept", "yes")
        client.close()
    assert (data_dir / "member").is_dir()

    with EmbeddedEtcd(data_dir=str(data_dir)) as etcd:
        client = connect(etcd.endpoint)
        assert client.get(f"{run_id}/kept")[0] == b"yes"
        client.close()
    assert (data_dir / "member").is_dir()


def test_a_connected_client_recovers_when_etcd_comes_back(tmp_path, run_id):
    data_dir = str(tmp_path / "etcd-data")
    etcd = EmbeddedEtcd(data_dir=data_dir)
    endpoint = etcd.start()
    client = connect(endpoint, timeout=2.0)
    try:
        client.put(f"{run_id}/k", "v")
        etcd.stop()
        with pytest.raises(Exception):
            client.get(f"{run_id}/k")
        etcd = EmbeddedEtcd(port=int(endpoint.rsplit(":", 1)[1]), data_dir=data_dir)
        etcd.start()
        deadline = time.monotonic() + 5.0
        while True:  # grpc reconnects by itself; the client must not refuse to try
            try:
                assert client.get(f"{run_id}/k")[0] == b"v"
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        client.close()
        etcd.stop()


def test_a_port_in_use_is_refused_with_a_clear_error(busy_port):
    etcd = EmbeddedEtcd(port=busy_port)
    with pytest.raises(RendezvousConnectionError, match="already in use") as info:
        etcd.start()
    assert f"127.0.0.1:{busy_port}" in str(info.value) and "\n" not in str(info.value)
    assert etcd.pid is None and not (etcd.data_dir and os.path.exists(etcd.data_dir))


def test_etcd_dies_when_its_owner_is_sigkilled(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import time
        from rendezvous.embedded import EmbeddedEtcd
        etcd = EmbeddedEtcd()
        etcd.start()
        print(etcd.pid, etcd.data_dir, flush=True)
        time.sleep(120)
    """))
    owner = python(str(script), stdout=subprocess.PIPE)
    try:
        pid_text, data_dir = owner.stdout.readline().split()
        etcd_pid = int(pid_text)
        assert not gone(etcd_pid)
        owner.kill()
        owner.wait()
        assert wait_gone(etcd_pid), f"etcd {etcd_pid} outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
    # Nobody is left to remove the temp dir after a SIGKILL; tidy it here.
    subprocess.run(["rm", "-rf", data_dir], check=True)


def test_connect_gives_up_on_a_closed_port():
    with pytest.raises(RendezvousConnectionError, match="unreachable.*python -m rendezvous"):
        connect(f"127.0.0.1:{free_port()}", timeout=0.5)


def test_connect_gives_up_on_a_server_that_never_answers(busy_port):
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match=f"127.0.0.1:{busy_port} is unreachable"):
        wait_for_etcd(f"127.0.0.1:{busy_port}", timeout=1.0)
    assert time.monotonic() - started < 10


def test_connect_gives_up_on_an_http_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(RendezvousConnectionError, match="not etcd"):
            connect(f"127.0.0.1:{server.server_address[1]}", timeout=0.5)
    finally:
        server.shutdown()
        server.server_close()


def test_wait_for_etcd_returns_for_a_live_etcd(etcd_endpoint):
    wait_for_etcd(etcd_endpoint, timeout=5.0)


@pytest.mark.timeout(60)
def test_the_service_serves_until_sigterm():
    port = quiet_port()
    service = python("-m", "rendezvous", "--listen", f"127.0.0.1:{port}",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = service.stdout.readline().strip()
        assert line == (f"rendezvous endpoint: etcd://127.0.0.1:{port}  "
                        f"(pass --rdzv-endpoint 127.0.0.1:{port} to every agent)")
        (etcd,) = psutil.Process(service.pid).children()
        data_dir = etcd.cmdline()[etcd.cmdline().index("--data-dir") + 1]
        assert os.path.isdir(data_dir)

        client = connect(f"127.0.0.1:{port}")
        client.put("service/k", "v")
        assert client.get("service/k")[0] == b"v"
        client.close()

        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=15) == 0
        assert not os.path.exists(data_dir)
        assert wait_gone(etcd.pid)
    finally:
        service.kill()
        service.communicate()


def test_the_service_reports_a_busy_port_in_one_line(busy_port):
    service = python("-m", "rendezvous", "--listen", f"127.0.0.1:{busy_port}",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = service.communicate(timeout=30)
    assert service.returncode == 1
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "in use" in err


@pytest.mark.parametrize("args", [["--listen", "127.0.0.1:http"], ["--listen", "a:b:c"], ["--nope"]])
def test_the_service_rejects_bad_arguments_in_one_line(args):
    service = python("-m", "rendezvous", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = service.communicate(timeout=30)
    assert service.returncode == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
