"""AdaScale's gain: how much further one step at a larger batch goes than a step at the reference.

AdaScale SGD (Johnson et al. 2020) runs a batch S times the reference batch with the learning rate
r * lr(tau), where the gain is

    r = (sigma2 + mu2) / (sigma2 / S + mu2)        (1 <= r <= S for S >= 1)

mu2 is the squared norm of the true gradient and sigma2 the variance (trace of the covariance) of a
gradient over one reference batch; the base schedule lr() advances in scale-invariant iterations,
tau += r per step. Both quantities are estimated each step from K independent gradients g_1..g_K,
each the mean over an equal share of the global batch (one per worker, or one per micro-batch):
each share is s = S / K reference batches, so Var(g_i) = sigma2 / s and E||mean g||^2 = mu2 +
sigma2 / S, which gives the unbiased estimators

    sigma2 = s / (K - 1) * sum_i ||g_i - g||^2         g = mean_i g_i
    mu2    = ||g||^2 - sigma2 / S

smoothed by bias-corrected exponential moving averages (mu2 clipped at 0 after averaging).

Pure: numpy (float64) when it is installed, plain Python floats otherwise; no torch import (a
tensor is converted through its own methods).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .policy import BatchPolicyError

try:
    import numpy as _np
except ImportError:  # the estimator works on Python floats, only slower
    _np = None


class AdaScaleGain:
    """Measures the AdaScale gain step by step and counts scale-invariant progress.

    scale: S, the global batch over the reference global batch (`BatchPlan.scale`). Call
        `set_scale` when a new plan takes effect: the averages carry over, because sigma2 and mu2
        are per reference batch and do not depend on S.
    smoothing: beta of the moving averages, in [0, 1); 0 uses each step's estimates alone.

    A training step:
        tau = gain.progress                 # tau_t, where the base schedule is read
        r = gain.update(worker_grads)       # r_t; progress becomes tau_t + r_t
        lr = r * base_lr(tau)

    Raises:
        BatchPolicyError: a scale <= 0, smoothing outside [0, 1), or gradients that are empty,
            of different lengths, or not finite (skip the update on steps the optimizer skips).
    """

    def __init__(self, scale: float, smoothing: float = 0.9):
        self.scale = _check_scale(scale)
        if not (isinstance(smoothing, numbers.Real) and 0.0 <= smoothing < 1.0):
            raise BatchPolicyError(f"AdaScale smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.progress = 0.0   # scale-invariant iterations so far (sum of the gains)
        self.steps = 0        # update() calls so far
        self.measurements = 0  # steps that had >= 2 gradients to measure the variance from
        self.last_gain = 1.0
        self._sigma2_avg = 0.0  # moving averages before bias correction
        self._mu2_avg = 0.0

    @staticmethod
    def gain(sigma2: float, mu2: float, scale: float) -> float:
        """r = (sigma2 + mu2) / (sigma2 / scale + mu2); 1.0 when both are 0 (nothing measured)."""
        scale = _check_scale(scale)
        if not (sigma2 >= 0.0 and mu2 >= 0.0 and math.isfinite(sigma2) and math.isfinite(mu2)):
            raise BatchPolicyError(f"AdaScale gain needs finite sigma2 >= 0 and mu2 >= 0, got "
                                   f"sigma2={sigma2!r}, mu2={mu2!r}")
        if sigma2 + mu2 == 0.0:
            return 1.0
        return (sigma2 + mu2) / (sigma2 / scale + mu2)

    @property
    def sigma2(self) -> float:
        """The smoothed gradient variance per reference batch (0.0 before any measurement)."""
        return self._corrected(self._sigma2_avg)

    @property
    def mu2(self) -> float:
        """The smoothed squared norm of the true gradient, clipped at 0."""
        return max(self._corrected(self._mu2_avg), 0.0)

    def set_scale(self, scale: float) -> None:
        self.scale = _check_scale(scale)

    def update(self, worker_grads: Sequence[Any]) -> float:
        """Measure one step from K flat gradients (arrays, tensors or float lists); return r.

        With fewer than 2 gradients the variance cannot be measured: the averages stay as they
        are and the gain comes from them (1.0 before any measurement).
        """
        vectors = [_as_vector(g) for g in worker_grads]
        if len(vectors) < 2:
            return self._step(None, len(vectors))
        sizes = {len(v) for v in vectors}
        if len(sizes) != 1 or 0 in sizes:
            raise BatchPolicyError(f"AdaScale needs gradients of one non-zero length, got "
                                   f"lengths {sorted(sizes)}")
        spread, mean_sq = _spread_and_mean_sq(vectors)
        return self._step((spread, mean_sq), len(vectors))

    def update_from_norms(self, sq_norm_sum: float, mean_sq_norm: float, count: int) -> float:
        """Measure one step from norms alone; return r.

        sq_norm_sum: sum over the K gradients of ||g_i||^2 (each worker's local squared norm,
            all-reduced with SUM); mean_sq_norm: ||g||^2 of their mean (the averaged gradient);
            count: K. Cheaper than `update` for real models; clipped at 0 against round-off.
        """
        if not (isinstance(count, numbers.Integral) and count >= 1):
            raise BatchPolicyError(f"AdaScale needs a count of gradients >= 1, got {count!r}")
        spread = max(float(sq_norm_sum) - count * float(mean_sq_norm), 0.0)
        return self._step((spread, float(mean_sq_norm)) if count >= 2 else None, int(count))

    def state_dict(self) -> Dict[str, float]:
        return {"scale": self.scale, "smoothing": self.smoothing, "progress": self.progress,
                "steps": self.steps, "measurements": self.measurements,
                "last_gain": self.last_gain, "sigma2_avg": self._sigma2_avg,
                "mu2_avg": self._mu2_avg}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        fresh = AdaScaleGain(state["scale"], state["smoothing"])  # validates both
        self.scale, self.smoothing = fresh.scale, fresh.smoothing
        self.progress, self.last_gain = float(state["progress"]), float(state["last_gain"])
        self.steps, self.measurements = int(state["steps"]), int(state["measurements"])
        self._sigma2_avg, self._mu2_avg = float(state["sigma2_avg"]), float(state["mu2_avg"])

    def _step(self, measured: Optional[Tuple[float, float]], count: int) -> float:
        """One step; measured is (sum_i ||g_i - g||^2, ||g||^2), or None when K < 2."""
        if measured is not None:
            spread, mean_sq = measured
            if not (math.isfinite(spread) and math.isfinite(mean_sq)):
                raise BatchPolicyError("AdaScale got gradients that are not finite; skip the "
                                       "update on steps the optimizer skips (e.g. AMP overflow)")
            share = self.scale / count  # reference batches behind each g_i
            sigma2 = share / (count - 1) * spread
            mu2 = mean_sq - sigma2 / self.scale
            beta = self.smoothing
            self._sigma2_avg = beta * self._sigma2_avg + (1.0 - beta) * sigma2
            self._mu2_avg = beta * self._mu2_avg + (1.0 - beta) * mu2
            self.measurements += 1
        r = self.gain(self.sigma2, self.mu2, self.scale)
        self.steps += 1
        self.progress += r
        self.last_gain = r
        return r

    def _corrected(self, average: float) -> float:
        if self.measurements == 0:
            return 0.0
        return average / (1.0 - self.smoothing ** self.measurements)


def _check_scale(scale: float) -> float:
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise BatchPolicyError(f"AdaScale scale (global batch / reference global batch) must be "
                               f"a finite number > 0, got {scale!r}")
    return float(scale)


def _as_vector(grad: Any) -> Any:
    """A flat float64 numpy array, or a list of floats when numpy is missing."""
    if hasattr(grad, "detach"):  # a torch tensor, converted without importing torch here
        grad = grad.detach().cpu().double().reshape(-1)
        grad = grad.numpy() if _np is not None else grad.tolist()
    if _np is not None:
        return _np.asarray(grad, dtype=_np.float64).reshape(-1)
    return [float(x) for x in grad]


def _spread_and_mean_sq(vectors: List[Any]) -> Tuple[float, float]:
    """(sum_i ||g_i - g||^2, ||g||^2), with g the mean: the spread computed directly, not as a
    difference of large norms, so that nearly equal gradients do not lose their variance."""
    k = len(vectors)
    if _np is not None and all(isinstance(v, _np.ndarray) for v in vectors):
        stacked = _np.stack(vectors)
        mean = stacked.mean(axis=0)
        return float(((stacked - mean) ** 2).sum()), float(mean @ mean)
    mean = [math.fsum(column) / k for column in zip(*vectors)]
    spread = math.fsum((x - m) ** 2 for v in vectors for x, m in zip(v, mean))
    return spread, math.fsum(m * m for m in mean)
