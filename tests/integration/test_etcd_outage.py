"""etcd outages: training goes on in the current world, and the job carries on when etcd returns
(restarted on its data dir, nothing lost)."""

import pytest

from rendezvous.embedded import EmbeddedEtcd

from .agents import STEPS, Agent, new_mark, processes_with_mark, read_events, wait_for
from tests.support import quiet_port

pytestmark = pytest.mark.integration



def steps_in(text, world):
    return text.count(f"world={world} rank=0")


def test_training_goes_on_while_etcd_is_down_and_the_job_grows_after(tmp_path, run_id):
    port, data_dir, logs, stop = quiet_port(), tmp_path / "etcd", tmp_path / "logs", tmp_path / "stop"
    etcd = EmbeddedEtcd(port=port, data_dir=str(data_dir))
    endpoint = etcd.start()
    mark, agents = new_mark(), []

    def start(name):
        agents.append(Agent(["--nnodes", "1:3", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                             "--rdzv-conf", "last_call_timeout=0.3,lease_ttl=30",
                             "--log-dir", logs, STEPS, "--stop-file", stop],
                            tmp_path, name, mark))
        return agents[-1]

    try:
        a = start("a")
        wait_for(lambda: steps_in(a.output(), 1) > 0, what="a training")
        b = start("b")
        wait_for(lambda: steps_in(a.output(), 2) > 0, what="a and b training")
        etcd.stop()
        before = steps_in(a.output(), 2)
        wait_for(lambda: steps_in(a.output(), 2) > before + 30, what="steps while etcd is down")
        assert any(e["event"] == "etcd_unreachable" for e in read_events(logs))
        assert a.proc.poll() is None and b.proc.poll() is None

        etcd = EmbeddedEtcd(port=port, data_dir=str(data_dir))
        etcd.start()
        wait_for(lambda: sum(e["event"] == "etcd_reconnected" for e in read_events(logs)) == 2,
                 what="both agents reconnected")
        start("c")  # the job's state in etcd survived: the newcomer joins the same job
        wait_for(lambda: steps_in(a.output(), 3) > 0, what="the job grown to 3")
        stop.touch()
        assert a.wait(60) == 0, a.output()[-2000:]
    finally:
        for agent in agents:
            agent.stop()
        etcd.stop()
    assert processes_with_mark(mark) == []
