"""Endpoint specs are checked before anything contacts Ray (serving/spec.py)."""
import pytest

from serving.spec import EndpointSpec, SpecError, check_target


@pytest.mark.parametrize("changes, message", [
    (dict(min_replicas=3, max_replicas=2), "max replicas \\(2\\) must be >= 1 and >= min \\(3\\)"),
    (dict(target_concurrency=0), "target concurrency must be > 0"),
    (dict(target="examples.serve_model"), "the model is MODULE:NAME"),
    (dict(name="My_Model"), "--name is 1-63 lower-case"),
    (dict(max_concurrency=0), "--max-concurrency must be >= 1"),
    (dict(timeout_s=0), "--timeout must be > 0"),
    (dict(slo_p95_ms=0), "SLO"),
])
def test_bad_specs_say_what_to_change(changes, message):
    spec = EndpointSpec(**{**dict(name="m", target="a:b"), **changes})
    with pytest.raises(SpecError, match=message):
        spec.check()


def test_a_spec_round_trips_and_gives_the_policy_its_settings():
    spec = EndpointSpec("m", "pkg.mod:Model", min_replicas=0, max_replicas=8,
                        target_concurrency=2, slo_p95_ms=250, idle_s=60)
    assert EndpointSpec.from_json(spec.to_json()) == spec
    cfg = spec.policy()
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target, cfg.idle_s, cfg.slo_p95_s) == \
        (0, 8, 2, 60, 0.25)


def test_the_target_is_imported_from_the_working_directory(tmp_path):
    (tmp_path / "my_model_mod.py").write_text("class Model:\n    def __call__(self, x):\n"
                                              "        return x\n")
    assert check_target("my_model_mod:Model", str(tmp_path)).__name__ == "Model"
    with pytest.raises(SpecError, match="cannot import 'no_such_mod'"):
        check_target("no_such_mod:Model", str(tmp_path))
    with pytest.raises(SpecError, match="has no class or function 'Nope'"):
        check_target("my_model_mod:Nope", str(tmp_path))
