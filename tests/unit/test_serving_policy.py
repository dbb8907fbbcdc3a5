"""The endpoint autoscaling policy with a controlled clock (serving/policy.py)."""
import pytest

from serving.policy import PolicyConfig, PolicyError, PolicyState, Sample, decide, observe


class Endpoint:
    """Drives the policy as the serving layer does: one sample and one decision per tick, the
    replicas it asks for ready `start_s` later."""

    def __init__(self, cfg, ready=1, start_s=0.0, tick=1.0):
        self.cfg, self.ready, self.start_s, self.tick = cfg, ready, start_s, tick
        self.state, self.now, self.pending = PolicyState(), 0.0, []
        self.history = []

    def run(self, seconds, demand, p95=None):
        for _ in range(int(seconds / self.tick)):
            self.now += self.tick
            self.state = observe(self.state, Sample(self.now, demand, p95), self.cfg)
            d = decide(self.state, self.now, self.ready, self.cfg)
            self.state = d.state
            self.pending = [(t, n) for t, n in self.pending if t > self.now]
            if d.replicas < self.ready:
                self.ready = d.replicas
            elif d.replicas > self.ready:
                self.pending.append((self.now + self.start_s, d.replicas))
            for t, n in list(self.pending):
                if t <= self.now + 1e-9:
                    self.ready = max(self.ready, n)
            self.ready = min(self.ready, max(d.replicas, self.ready))
            if self.start_s == 0 and d.replicas > self.ready:
                self.ready = d.replicas
            self.history.append((self.now, d.replicas, d.panic, d.reason))
        return self.history[-1]


def test_a_load_step_panics_and_scales_up_within_seconds():
    ep = Endpoint(PolicyConfig(min_replicas=1, max_replicas=16, target=4))
    ep.run(30, demand=2)  # quiet: one replica
    assert ep.ready == 1
    ep.run(6, demand=32)  # 1 -> 32 concurrent clients
    wanted = [(t, n, panic) for t, n, panic, _ in ep.history[-6:]]
    assert wanted[0][2] and wanted[0][1] >= 2  # the first tick of the step already panics
    assert [n for _, n, _ in wanted] == sorted(n for _, n, _ in wanted)
    assert ep.ready == 8  # 32 / 4, once the panic window holds only the step
    ep.run(30, demand=32)
    assert ep.ready == 8  # steady under the load


def test_no_scale_down_while_panicking_and_bounded_steps_after():
    ep = Endpoint(PolicyConfig(min_replicas=1, max_replicas=16, target=4))
    ep.run(10, demand=2)
    ep.run(10, demand=40)
    assert ep.ready == 10
    ep.run(20, demand=2)  # the load is gone, but the panic holds for a stable window
    assert ep.ready == 10 and ep.history[-1][2]
    ep.run(60, demand=2)  # panic over: down, at most halving per decision
    counts = [n for _, n, _, _ in ep.history[-60:]]
    assert counts[-1] == 1
    assert all(b >= -(-a // 2) for a, b in zip(counts, counts[1:]))


def test_scale_to_zero_after_the_idle_time_and_a_cold_start_asks_for_one_at_once():
    ep = Endpoint(PolicyConfig(min_replicas=0, max_replicas=4, target=4, idle_s=30,
                               stable_window_s=20, panic_window_s=4))
    ep.run(5, demand=3)
    assert ep.ready == 1
    ep.run(29, demand=0)
    assert ep.ready == 1  # idle, but not for 30 s yet
    ep.run(6, demand=0)
    assert ep.ready == 0 and "scale to zero" in ep.history[-1][3]
    ep.run(1, demand=1)  # a request arrives: held at the router, one replica wanted now
    assert ep.history[-1][1] == 1 and "cold start" in ep.history[-1][3]


def test_min_zero_without_idle_time_elapsed_keeps_one_replica():
    ep = Endpoint(PolicyConfig(min_replicas=0, max_replicas=4, target=4, idle_s=300))
    ep.run(5, demand=1)
    ep.run(100, demand=0)
    assert ep.ready == 1 and "kept at one" in ep.history[-1][3]


def test_never_more_than_max_and_never_fewer_than_min():
    ep = Endpoint(PolicyConfig(min_replicas=2, max_replicas=3, target=1))
    ep.run(5, demand=0)
    assert ep.ready == 2
    ep.run(20, demand=100)
    assert ep.ready == 3 and max(n for _, n, _, _ in ep.history) == 3
    assert "capped at max 3" in ep.history[-1][3]


def test_the_slo_adds_a_replica_while_p95_is_above_it():
    ep = Endpoint(PolicyConfig(min_replicas=1, max_replicas=8, target=10, slo_p95_s=0.2))
    ep.run(10, demand=4, p95=0.05)
    assert ep.ready == 1
    ep.run(3, demand=4, p95=0.5)  # demand alone asks for 1, latency says more
    assert ep.ready == 4 and "above the SLO" in ep.history[-1][3]


def test_the_decision_depends_only_on_its_inputs():
    cfg = PolicyConfig(min_replicas=0, max_replicas=8)
    state = PolicyState()
    for t in range(1, 20):
        state = observe(state, Sample(float(t), 9.0), cfg)
    a, b = decide(state, 20.0, 1, cfg), decide(state, 20.0, 1, cfg)
    assert a == b and a.replicas == 3 and a.panic


@pytest.mark.parametrize("changes, message", [
    (dict(min_replicas=3, max_replicas=2), "max replicas"),
    (dict(target=0), "target concurrency must be > 0"),
    (dict(min_replicas=-1), "min replicas must be >= 0"),
    (dict(panic_window_s=90), "panic window"),
    (dict(slo_p95_s=0), "SLO"),
])
def test_bad_settings_name_what_is_wrong(changes, message):
    with pytest.raises(PolicyError, match=message):
        PolicyConfig(**changes).check()
