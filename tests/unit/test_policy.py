"""Batch plans, learning-rate policies and the AdaScale gain, checked against known values."""
import math
import random

import pytest

from elastic.adascale import AdaScaleGain
from elastic import adascale
from elastic.policy import (AdaScale, BatchPlan, BatchPolicyError, FixedBatch, LinearScaling,
                            LrSchedule, SqrtScaling, best_global_batch, make_policy,
                            valid_global_batches)


# --- fixed: the plan covers the global batch, and its gradient is exact ---------------------

@pytest.mark.parametrize("global_batch,world", [(g, w) for g in (64, 50, 7)
                                                for w in range(1, 8 + 1) if w <= g])
@pytest.mark.parametrize("max_micro", [None, 8, 3, 1])
def test_fixed_plan_covers_the_global_batch(global_batch, world, max_micro):
    plan = FixedBatch(global_batch, max_micro).plan(world)
    assert plan.world_size == world and plan.global_batch == global_batch
    assert plan.lr_factor == 1.0 and plan.scale == 1.0
    assert sum(plan.rank_batch(r) for r in range(world)) == global_batch
    assert all(len(sizes) == plan.accum_steps for sizes in plan.micro_batches)
    offset = 0
    for rank in range(world):  # consecutive slices, in rank order, covering [0, global)
        assert plan.rank_offset(rank) == offset
        offset += plan.rank_batch(rank)
    assert offset == global_batch
    shares = [plan.rank_batch(r) for r in range(world)]
    assert max(shares) - min(shares) <= 1
    if max_micro is not None:
        assert max(max(sizes) for sizes in plan.micro_batches) <= max_micro
        assert plan.accum_steps == math.ceil(max(shares) / max_micro)
    else:
        assert plan.accum_steps == 1


def test_fixed_plan_known_split():
    # 50 over 3 workers: shares 17, 17, 16; ceil(17 / 8) = 3 micro-steps; 17 = 6 + 6 + 5.
    plan = FixedBatch(50, max_micro_batch=8).plan(3)
    assert plan.micro_batches == ((6, 6, 5), (6, 6, 5), (6, 5, 5))
    assert plan.accum_steps == 3
    assert [plan.rank_offset(r) for r in range(3)] == [0, 17, 34]
    assert plan.loss_scale(0, 0) == 6 * 3 / 50
    assert plan.loss_scale(2, 2) == 5 * 3 / 50


def test_fixed_plan_can_have_an_empty_micro_batch():
    # 5 over 2 workers with micro-batches of 1: shares 3 and 2, 3 micro-steps each.
    plan = FixedBatch(5, max_micro_batch=1).plan(2)
    assert plan.micro_batches == ((1, 1, 1), (1, 1, 0))
    assert plan.loss_scale(1, 2) == 0.0


def _data(n, dim=3, seed=0):
    rng = random.Random(seed)
    xs = [[rng.uniform(-1, 1) for _ in range(dim)] for _ in range(n)]
    ys = [rng.uniform(-1, 1) for _ in range(n)]
    return xs, ys


def _mean_grad(w, xs, ys):
    """Gradient of the mean of 0.5 * (w.x - y)^2 over the samples (zero for no samples)."""
    grad = [0.0] * len(w)
    for x, y in zip(xs, ys):
        err = sum(wi * xi for wi, xi in zip(w, x)) - y
        grad = [g + err * xi for g, xi in zip(grad, x)]
    return [g / len(xs) for g in grad] if xs else grad


def _emulate(plan, w, xs, ys):
    """What DDP computes under the plan: per rank, grad of each micro-batch's mean loss times
    loss_scale, summed over micro-steps; then the average over ranks."""
    total = [0.0] * len(w)
    for rank in range(plan.world_size):
        start = plan.rank_offset(rank)
        for step, size in enumerate(plan.micro_batches[rank]):
            g = _mean_grad(w, xs[start:start + size], ys[start:start + size])
            scale = plan.loss_scale(rank, step)
            total = [t + scale * gi for t, gi in zip(total, g)]
            start += size
    return [t / plan.world_size for t in total]


@pytest.mark.parametrize("global_batch,max_micro", [(64, 8), (50, 8), (50, 3), (13, 1)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6, 7, 8])
def test_fixed_plan_gradient_equals_the_single_process_gradient(global_batch, max_micro, world):
    xs, ys = _data(global_batch)
    w = [0.3, -0.7, 1.1]
    want = _mean_grad(w, xs, ys)
    got = _emulate(FixedBatch(global_batch, max_micro).plan(world), w, xs, ys)
    for g, e in zip(got, want):
        assert g == pytest.approx(e, rel=1e-12, abs=1e-15)


# --- bad input -------------------------------------------------------------------------------

def test_global_batch_smaller_than_the_world():
    with pytest.raises(BatchPolicyError, match="global batch 3 is smaller than the world of 4 "
                                               "workers; raise --global-batch-size"):
        FixedBatch(3).plan(4)


@pytest.mark.parametrize("bad", [0, -2])
def test_max_micro_batch_below_one(bad):
    with pytest.raises(BatchPolicyError, match="maximum micro-batch must be an integer >= 1"):
        FixedBatch(64, max_micro_batch=bad)
    with pytest.raises(BatchPolicyError, match="maximum micro-batch"):
        make_policy("linear", per_worker_batch=8, max_micro_batch=bad)


def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(BatchPolicyError, match="unknown batch policy 'cubic'; choose one of: "
                                               "fixed, linear, sqrt, adascale"):
        make_policy("cubic", global_batch=64)


def test_linear_global_batch_must_divide_by_the_reference_world():
    with pytest.raises(BatchPolicyError, match="global batch 50 does not divide by the "
                                               "reference world of 4"):
        make_policy("linear", global_batch=50, reference_world=4)


def test_bad_combinations():
    with pytest.raises(BatchPolicyError, match="needs a global batch size"):
        make_policy("fixed", per_worker_batch=8)
    with pytest.raises(BatchPolicyError, match="needs a per-worker batch size or a global"):
        make_policy("sqrt")
    with pytest.raises(BatchPolicyError, match="disagree"):
        make_policy("linear", global_batch=64, per_worker_batch=16, reference_world=2)
    with pytest.raises(BatchPolicyError, match="world size must be an integer >= 1"):
        FixedBatch(8).plan(0)
    with pytest.raises(BatchPolicyError, match="global batch size must be an integer >= 1"):
        FixedBatch(0)


def test_factory_builds_each_policy():
    assert isinstance(make_policy("FIXED", global_batch=64), FixedBatch)
    linear = make_policy("linear", global_batch=64, reference_world=4, warmup_steps=5)
    assert isinstance(linear, LinearScaling)
    assert (linear.per_worker_batch, linear.warmup_steps) == (16, 5)
    assert linear.lr_schedule().warmup_steps == 5
    assert isinstance(make_policy("sqrt", per_worker_batch=8), SqrtScaling)
    ada = make_policy("adascale", per_worker_batch=8, global_batch=16, reference_world=2)
    assert isinstance(ada, AdaScale) and ada.reference_global_batch == 16


def test_inconsistent_plan_is_refused():
    with pytest.raises(BatchPolicyError, match="add up to 5, not the global batch 6"):
        BatchPlan(world_size=2, global_batch=6, micro_batches=((3,), (2,)), accum_steps=1)
    with pytest.raises(BatchPolicyError, match="rank 1 has 1 micro-batches"):
        BatchPlan(world_size=2, global_batch=5, micro_batches=((2, 1), (2,)), accum_steps=2)


# --- linear and sqrt -------------------------------------------------------------------------

def test_linear_lr_factors_against_reference_two():
    policy = LinearScaling(per_worker_batch=32, reference_world=2)
    assert [policy.plan(w).lr_factor for w in (1, 2, 4, 3)] == [0.5, 1.0, 2.0, 1.5]
    plan = policy.plan(3)
    assert plan.global_batch == 96 and plan.micro_batches == ((32,), (32,), (32,))


def test_per_worker_batch_is_split_into_micro_batches():
    plan = LinearScaling(per_worker_batch=10, reference_world=1, max_micro_batch=4).plan(2)
    assert plan.micro_batches == ((4, 3, 3), (4, 3, 3)) and plan.accum_steps == 3


def test_sqrt_lr_factor():
    # global 32 * 8 = 256 against the reference 32 * 2 = 64: sqrt(4) = 2.
    policy = SqrtScaling(per_worker_batch=32, reference_world=2)
    plan = policy.plan(8)
    assert (plan.global_batch, plan.lr_factor, plan.scale) == (256, 2.0, 4.0)
    assert policy.plan(1).lr_factor == math.sqrt(0.5)


def test_adascale_plan_keeps_factor_one():
    plan = AdaScale(per_worker_batch=16, reference_world=2).plan(6)
    assert (plan.global_batch, plan.lr_factor, plan.scale) == (96, 1.0, 3.0)


def _plan(factor):
    return BatchPlan(world_size=1, global_batch=1, micro_batches=((1,),), accum_steps=1,
                     lr_factor=factor)


def test_warmup_ramp_after_a_change():
    schedule = LrSchedule(warmup_steps=4, initial_factor=None)
    schedule.on_plan(_plan(1.0), step=0)
    assert [schedule.factor(s) for s in range(3)] == [1.0, 1.0, 1.0]
    schedule.on_plan(_plan(2.0), step=10)  # factor 1 -> 2 over 4 steps
    assert [schedule.factor(s) for s in range(9, 15)] == [1.0, 1.25, 1.5, 1.75, 2.0, 2.0]
    schedule.on_plan(_plan(2.0), step=20)  # same factor: no new ramp
    assert schedule.factor(20) == 2.0


def test_change_mid_ramp_starts_from_the_factor_reached():
    schedule = LrSchedule(warmup_steps=4, initial_factor=None)
    schedule.on_plan(_plan(1.0), step=0)
    schedule.on_plan(_plan(3.0), step=10)
    assert [schedule.factor(s) for s in (10, 11)] == [1.5, 2.0]
    schedule.on_plan(_plan(1.0), step=12)   # from 2.0 down to 1.0
    assert [schedule.factor(s) for s in range(12, 17)] == [1.75, 1.5, 1.25, 1.0, 1.0]


def test_first_plan_warms_up_from_the_base_rate_and_zero_warmup_jumps():
    schedule = LrSchedule(warmup_steps=2)  # initial factor 1.0
    schedule.on_plan(_plan(4.0), step=0)
    assert [schedule.factor(s) for s in range(3)] == [2.5, 4.0, 4.0]
    jump = LrSchedule(warmup_steps=0)
    jump.on_plan(_plan(4.0), step=5)
    assert jump.factor(5) == 4.0


def test_lr_schedule_survives_a_restart():
    schedule = LrSchedule(warmup_steps=4, initial_factor=None)
    schedule.on_plan(_plan(1.0), step=0)
    schedule.on_plan(_plan(2.0), step=10)
    restored = LrSchedule(warmup_steps=0)
    restored.load_state_dict(schedule.state_dict())
    restored.on_plan(_plan(2.0), step=11)  # a restarted worker is told the same plan again
    assert [restored.factor(s) for s in range(10, 14)] == [1.25, 1.5, 1.75, 2.0]


# --- AdaScale --------------------------------------------------------------------------------

def test_gain_by_hand():
    # (sigma2 + mu2) / (sigma2 / S + mu2) = (3 + 1) / (3 / 4 + 1) = 4 / 1.75 = 16 / 7
    assert AdaScaleGain.gain(3.0, 1.0, 4.0) == pytest.approx(16 / 7, rel=1e-15)
    assert AdaScaleGain.gain(0.0, 2.0, 8.0) == 1.0        # no noise: no gain
    assert AdaScaleGain.gain(5.0, 0.0, 8.0) == 8.0        # all noise: gain S
    assert AdaScaleGain.gain(0.0, 0.0, 8.0) == 1.0        # nothing measured
    assert AdaScaleGain.gain(3.0, 1.0, 1.0) == 1.0
    with pytest.raises(BatchPolicyError, match="scale"):
        AdaScaleGain.gain(1.0, 1.0, 0.0)
    with pytest.raises(BatchPolicyError, match="sigma2 >= 0"):
        AdaScaleGain.gain(-1.0, 1.0, 2.0)


# Four workers, scale S = 2, so each g_i is over s = S / K = 0.5 reference batches:
#   g = mean of (1, 2), (3, 0), (1, 0), (3, 2) = (2, 1);  ||g||^2 = 5
#   deviations (-1, 1), (1, -1), (-1, -1), (1, 1): sum of squares 2 + 2 + 2 + 2 = 8
#   sigma2 = s / (K - 1) * 8 = 0.5 / 3 * 8 = 4/3
#   mu2 = ||g||^2 - sigma2 / S = 5 - 2/3 = 13/3
#   r = (4/3 + 13/3) / (2/3 + 13/3) = 17/15
GRADS = [[1.0, 2.0], [3.0, 0.0], [1.0, 0.0], [3.0, 2.0]]


def _check_first_step(gain):
    assert gain.update(GRADS) == pytest.approx(17 / 15, rel=1e-14)
    assert gain.sigma2 == pytest.approx(4 / 3, rel=1e-14)
    assert gain.mu2 == pytest.approx(13 / 3, rel=1e-14)


def test_update_on_synthetic_gradients():
    gain = AdaScaleGain(scale=2.0, smoothing=0.5)
    _check_first_step(gain)
    # Second step, identical gradients (1, 1): sigma2 = 0, mu2 = 2. Averages (beta 0.5):
    #   sigma2: 0.5 * (0.5 * 4/3) + 0.5 * 0 = 1/3, corrected / (1 - 0.25) = 4/9
    #   mu2:    0.5 * (0.5 * 13/3) + 0.5 * 2 = 25/12, corrected / 0.75 = 25/9
    #   r = (4/9 + 25/9) / (2/9 + 25/9) = 29/27
    assert gain.update([[1.0, 1.0]] * 4) == pytest.approx(29 / 27, rel=1e-14)
    assert gain.progress == pytest.approx(17 / 15 + 29 / 27, rel=1e-14)
    assert gain.steps == 2


def test_update_from_norms_matches_update():
    # sum of ||g_i||^2 = 5 + 9 + 1 + 13 = 28, and 28 - 4 * 5 = 8, the same spread.
    gain = AdaScaleGain(scale=2.0)
    assert gain.update_from_norms(28.0, 5.0, 4) == pytest.approx(17 / 15, rel=1e-14)


def test_update_without_numpy(monkeypatch):
    monkeypatch.setattr(adascale, "_np", None)
    _check_first_step(AdaScaleGain(scale=2.0))


def test_update_accepts_arrays_and_tensors():
    np = pytest.importorskip("numpy")
    _check_first_step(AdaScaleGain(scale=2.0))
    gain = AdaScaleGain(scale=2.0)
    assert gain.update([np.array(g) for g in GRADS]) == pytest.approx(17 / 15, rel=1e-14)
    torch = pytest.importorskip("torch")
    tensors = [torch.tensor(g, requires_grad=True) for g in GRADS]
    assert AdaScaleGain(scale=2.0).update(tensors) == pytest.approx(17 / 15, rel=1e-14)


def test_identical_gradients_give_gain_one():
    gain = AdaScaleGain(scale=8.0)
    for _ in range(3):
        assert gain.update([[0.5, -1.0, 2.0]] * 4) == 1.0
    assert gain.sigma2 == 0.0 and gain.progress == 3.0


def test_scale_one_gives_gain_one():
    gain = AdaScaleGain(scale=1.0)
    assert gain.update(GRADS) == 1.0
    assert gain.update([[10.0, 0.0], [-10.0, 0.0]]) == 1.0


def test_negative_mu2_is_clipped_and_the_gain_is_the_scale():
    # K = 2, S = 4, s = 2: g = 0, spread = 1 + 1 = 2, sigma2 = 2 / 1 * 2 = 4,
    # mu2 = 0 - 4 / 4 = -1 -> 0, so r = (4 + 0) / (4 / 4 + 0) = 4.
    gain = AdaScaleGain(scale=4.0, smoothing=0.0)
    assert gain.update([[1.0], [-1.0]]) == 4.0


def test_progress_accumulates_gains_and_survives_a_restart():
    gain = AdaScaleGain(scale=2.0, smoothing=0.9)
    gains = [gain.update(GRADS) for _ in range(3)]
    assert gain.progress == pytest.approx(sum(gains))
    restored = AdaScaleGain(scale=1.0)
    restored.load_state_dict(gain.state_dict())
    assert restored.update(GRADS) == gain.update(GRADS)
    assert restored.progress == gain.progress


def test_one_gradient_keeps_the_last_estimate():
    gain = AdaScaleGain(scale=2.0)
    assert gain.update([[1.0, 2.0]]) == 1.0  # nothing measured yet
    first = gain.update(GRADS)
    gain.set_scale(2.0)
    assert gain.update([[5.0, 5.0]]) == first  # a world of one cannot measure the variance
    assert gain.measurements == 1 and gain.steps == 3


def test_bad_gradients():
    with pytest.raises(BatchPolicyError, match="one non-zero length"):
        AdaScaleGain(scale=2.0).update([[1.0, 2.0], [1.0]])
    with pytest.raises(BatchPolicyError, match="not finite"):
        AdaScaleGain(scale=2.0).update([[1.0, float("nan")], [1.0, 2.0]])
    with pytest.raises(BatchPolicyError, match="smoothing"):
        AdaScaleGain(scale=2.0, smoothing=1.0)


# --- valid global batches ----------------------------------------------------------------------

def test_valid_global_batches_by_hand():
    # Micro-batches 2 or 3, worlds 1..3, batches up to 12. A batch B is valid for world w when
    # w * m divides B for m in {2, 3}: 12 and 6 suit every world; 9 = 3*3*1 = 1*3*3 but not
    # 2 workers (4 and 6 do not divide 9); 8 and 4 suit 1 and 2 workers; 10, 3 and 2 only one;
    # 11, 7, 5 and 1 none.
    assert valid_global_batches(12, [2, 3], 1, 3) == [
        (12, [1, 2, 3]), (6, [1, 2, 3]), (9, [1, 3]), (8, [1, 2]), (4, [1, 2]),
        (10, [1]), (3, [1]), (2, [1])]
    assert best_global_batch(12, [2, 3], 1, 3) == (12, [1, 2, 3])


def test_no_valid_global_batch():
    with pytest.raises(BatchPolicyError, match="no global batch up to 4 can be made"):
        valid_global_batches(4, [8], 1, 2)
    with pytest.raises(BatchPolicyError, match="above the maximum"):
        valid_global_batches(64, [8], 4, 2)


# --- the plan in the environment ---------------------------------------------------------------

def test_plan_round_trips_through_the_environment():
    plan = SqrtScaling(per_worker_batch=10, reference_world=3, max_micro_batch=4).plan(5)
    env = plan.to_env()
    assert env["ELASTIC_GLOBAL_BATCH"] == "50" and env["ELASTIC_ACCUM_STEPS"] == "3"
    assert env["ELASTIC_MICRO_BATCHES"] == "[[4,3,3],[4,3,3],[4,3,3],[4,3,3],[4,3,3]]"
    assert BatchPlan.from_env(env) == plan
    assert BatchPlan.from_env({}) is None
    uneven = FixedBatch(50, 8).plan(3)
    assert BatchPlan.from_env({**uneven.to_env(), "PATH": "/bin"}) == uneven


def test_malformed_plan_in_the_environment():
    env = FixedBatch(50, 8).plan(3).to_env()
    with pytest.raises(BatchPolicyError, match="ELASTIC_ACCUM_STEPS is 'three'"):
        BatchPlan.from_env({**env, "ELASTIC_ACCUM_STEPS": "three"})
    del env["ELASTIC_LR_FACTOR"]
    with pytest.raises(BatchPolicyError, match="ELASTIC_LR_FACTOR is missing"):
        BatchPlan.from_env(env)
