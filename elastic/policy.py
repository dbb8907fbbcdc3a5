"""Batch-size and learning-rate policies: which batch plan a world size gets.

A `BatchPolicy` turns a world size into a `BatchPlan`: the global batch, each rank's micro-batches
for one optimizer step, the gradient-accumulation steps and the learning-rate factor. Policies are
pure and deterministic, so every agent and worker that computes the plan for a world size gets the
same one. The launcher exports a plan with `BatchPlan.to_env`; a worker reads it back with
`BatchPlan.from_env`. `LrSchedule` ramps the learning-rate factor after each change, and
`valid_global_batches` picks global batches that many world sizes can make (in the spirit of
DeepSpeed's elasticity). AdaScale's gain is measured while training, in `elastic.adascale`.
"""
from __future__ import annotations

import abc
import json
import math
import numbers
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from elastic.contract import (PLAN_ACCUM_STEPS as ENV_ACCUM_STEPS,
                              PLAN_GLOBAL_BATCH as ENV_GLOBAL_BATCH,
                              PLAN_LR_FACTOR as ENV_LR_FACTOR,
                              PLAN_LR_WARMUP_STEPS as ENV_LR_WARMUP_STEPS,
                              PLAN_MICRO_BATCHES as ENV_MICRO_BATCHES,
                              PLAN_POLICY as ENV_POLICY, PLAN_SCALE as ENV_SCALE,
                              PLAN_WORLD_SIZE as ENV_WORLD_SIZE)

POLICY_NAMES = ("fixed", "linear", "sqrt", "adascale")


class BatchPolicyError(ValueError):
    """A batch policy, plan or setting that cannot work; the message says what to change."""


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step is split over a world of workers.

    global_batch: samples per optimizer step, over all ranks. Ranks take consecutive slices of it
        in rank order.
    micro_batches: per rank, the sizes of its micro-batches for one step; every rank has
        `accum_steps` of them so that collectives line up. A rank may have an empty micro-batch
        when the batch does not divide; it must still take part in the step's all-reduce, with a
        zero gradient (a mean over no samples is NaN, and NaN * 0 is still NaN).
    lr_factor: multiply the base learning rate by this (before any warm-up ramp).
    scale: the global batch over the reference global batch (1.0 for `fixed`); AdaScale's S.
    policy: the name of the policy that made the plan.
    warmup_steps: optimizer steps over which the learning-rate factor ramps to this plan's value
        after a change (`LrSchedule`; --lr-warmup-steps).

    Raises:
        BatchPolicyError: the fields disagree (sizes do not sum to the global batch, ...).
    """

    world_size: int
    global_batch: int
    micro_batches: Tuple[Tuple[int, ...], ...]
    accum_steps: int
    lr_factor: float = 1.0
    scale: float = 1.0
    policy: str = "fixed"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "warmup_steps", _at_least(self.warmup_steps, 0,
                                                           "batch plan: warmup_steps"))
        for name in ("world_size", "global_batch", "accum_steps"):
            value = getattr(self, name)
            object.__setattr__(self, name, _at_least(value, 1, f"batch plan: {name}",
                                                     "the plan is inconsistent"))
        micro = tuple(tuple(int(m) if _is_int(m) else m for m in r) for r in self.micro_batches)
        object.__setattr__(self, "micro_batches", micro)
        if len(self.micro_batches) != self.world_size:
            raise BatchPolicyError(f"batch plan: {len(self.micro_batches)} ranks of micro-batches "
                                   f"for a world of {self.world_size}")
        for rank, sizes in enumerate(self.micro_batches):
            if len(sizes) != self.accum_steps:
                raise BatchPolicyError(f"batch plan: rank {rank} has {len(sizes)} micro-batches, "
                                       f"not accum_steps={self.accum_steps}")
            if not all(_is_int(m) and m >= 0 for m in sizes):
                raise BatchPolicyError(f"batch plan: rank {rank} has micro-batch sizes "
                                       f"{list(sizes)}; they must be integers >= 0")
        total = sum(sum(sizes) for sizes in self.micro_batches)
        if total != self.global_batch:
            raise BatchPolicyError(f"batch plan: micro-batches add up to {total}, "
                                   f"not the global batch {self.global_batch}")
        for name in ("lr_factor", "scale"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise BatchPolicyError(f"batch plan: {name} must be a finite number > 0, "
                                       f"got {value!r}")
            object.__setattr__(self, name, float(value))

    def rank_batch(self, rank: int) -> int:
        """Samples this rank processes per optimizer step."""
        return sum(self.micro_batches[self._rank(rank)])

    def rank_offset(self, rank: int) -> int:
        """Where this rank's samples start inside the global batch."""
        return sum(sum(sizes) for sizes in self.micro_batches[:self._rank(rank)])

    def loss_scale(self, rank: int, micro_step: int) -> float:
        """Multiply the mean loss of this micro-batch by this (0 for an empty micro-batch).

        With DDP averaging gradients over world_size ranks and gradients summed over accum_steps
        micro-steps, the result is exactly the gradient of the mean loss over the global batch,
        also when micro-batches differ in size: each sample's gradient ends up weighted
        micro * world / global * 1/micro * 1/world = 1/global.
        """
        sizes = self.micro_batches[self._rank(rank)]
        if not 0 <= micro_step < self.accum_steps:
            raise IndexError(f"micro_step {micro_step} outside [0, {self.accum_steps})")
        return sizes[micro_step] * self.world_size / self.global_batch

    def to_env(self) -> Dict[str, str]:
        """The plan as environment variables for a worker (floats keep every bit)."""
        return {
            ENV_POLICY: self.policy,
            ENV_WORLD_SIZE: str(self.world_size),
            ENV_GLOBAL_BATCH: str(self.global_batch),
            ENV_ACCUM_STEPS: str(self.accum_steps),
            ENV_MICRO_BATCHES: json.dumps([list(r) for r in self.micro_batches],
                                          separators=(",", ":")),
            ENV_LR_FACTOR: repr(float(self.lr_factor)),
            ENV_SCALE: repr(float(self.scale)),
            ENV_LR_WARMUP_STEPS: str(self.warmup_steps),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Optional["BatchPlan"]:
        """The plan the launcher exported, or None when it exported none.

        Raises:
            BatchPolicyError: a variable is missing or malformed.
        """
        if ENV_GLOBAL_BATCH not in env:
            return None
        micro = _read_env(env, ENV_MICRO_BATCHES, json.loads)
        if not isinstance(micro, list) or not all(isinstance(r, list) for r in micro):
            raise BatchPolicyError(f"{ENV_MICRO_BATCHES} must be a JSON list of lists, got "
                                   f"{env[ENV_MICRO_BATCHES]!r}")
        return cls(world_size=_read_env(env, ENV_WORLD_SIZE, int),
                   global_batch=_read_env(env, ENV_GLOBAL_BATCH, int),
                   micro_batches=micro,
                   accum_steps=_read_env(env, ENV_ACCUM_STEPS, int),
                   lr_factor=_read_env(env, ENV_LR_FACTOR, float),
                   scale=_read_env(env, ENV_SCALE, float) if ENV_SCALE in env else 1.0,
                   policy=env.get(ENV_POLICY, "fixed"),
                   warmup_steps=(_read_env(env, ENV_LR_WARMUP_STEPS, int)
                                 if ENV_LR_WARMUP_STEPS in env else 0))

    def _rank(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} outside a world of {self.world_size}")
        return rank


class LrSchedule:
    """Warm-up ramp after each change of the plan's learning-rate factor.

    When the factor changes from a to b by a plan taking effect at optimizer step s, steps
    s, s+1, ..., s+warmup_steps-1 get a + (b - a) * k / warmup_steps for k = 1..warmup_steps, and
    later steps get b; with warmup_steps=0 the factor jumps to b at s. A change in the middle of a
    ramp starts the new ramp from the factor reached, so the learning rate never jumps.

    initial_factor: the factor before the first plan. 1.0 (the base learning rate, as tuned on the
        reference world) makes a job that starts above its reference world warm up to it, as in
        Goyal et al.; None starts at the first plan's factor.
    """

    def __init__(self, warmup_steps: int, initial_factor: Optional[float] = 1.0):
        self.warmup_steps = _at_least(warmup_steps, 0, "the warm-up steps")
        self.initial_factor = None if initial_factor is None else float(initial_factor)
        self._start: Optional[int] = None  # the step the last change took effect
        self._from = self._to = 1.0 if initial_factor is None else float(initial_factor)

    def on_plan(self, plan: BatchPlan, step: int) -> None:
        """`plan` takes effect at optimizer step `step`."""
        target = float(plan.lr_factor)
        if self._start is None:
            self._from = target if self.initial_factor is None else float(self.initial_factor)
        elif target == self._to:
            return
        else:  # start from the factor the last step taken had, so the rate never jumps
            self._from = self.factor(step - 1)
        self._start, self._to = step, target

    def factor(self, step: int) -> float:
        """The learning-rate factor for optimizer step `step` (from the latest change on)."""
        if self._start is None or step < self._start:
            return self._from
        k = step - self._start + 1
        if self.warmup_steps == 0 or k >= self.warmup_steps:
            return self._to
        return self._from + (self._to - self._from) * k / self.warmup_steps

    def state_dict(self) -> Dict[str, object]:
        return {"warmup_steps": self.warmup_steps, "initial_factor": self.initial_factor,
                "start": self._start, "from": self._from, "to": self._to}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.warmup_steps = _at_least(state["warmup_steps"], 0, "the warm-up steps")
        initial = state["initial_factor"]
        self.initial_factor = None if initial is None else float(initial)  # type: ignore[arg-type]
        start = state["start"]
        self._start = None if start is None else int(start)  # type: ignore[call-overload]
        self._from, self._to = float(state["from"]), float(state["to"])  # type: ignore[arg-type]


class BatchPolicy(abc.ABC):
    """Contract: the batch plan for a world size. Pure and deterministic.

    name: the policy's name on the command line. warmup_steps: how many optimizer steps the
    learning-rate factor takes to reach a new plan's value (see `LrSchedule`).
    """

    name: str = ""
    warmup_steps: int = 0

    @abc.abstractmethod
    def plan(self, world_size: int) -> BatchPlan:
        """The plan for `world_size` workers.

        Raises:
            BatchPolicyError: world_size < 1, or the policy cannot serve this world size.
        """

    def lr_schedule(self) -> LrSchedule:
        """A fresh warm-up schedule with this policy's warm-up length."""
        return LrSchedule(self.warmup_steps)

    def describe(self) -> Dict[str, object]:
        """The policy as plain data (name and settings), e.g. for the job spec in etcd."""
        out: Dict[str, object] = {"name": self.name}
        for key in ("global_batch", "per_worker_batch", "reference_world", "max_micro_batch",
                    "warmup_steps"):
            if hasattr(self, key):
                out[key] = getattr(self, key)
        return out


class FixedBatch(BatchPolicy):
    """"fixed": the global batch stays constant, so a run that changes size makes the same updates.

    Each rank's share is at most one sample apart from another's; accum_steps is
    ceil(largest share / max_micro_batch) (1 without a limit), and each share is split as evenly as
    possible over accum_steps micro-batches. lr_factor is always 1.0.
    """

    name = "fixed"

    def __init__(self, global_batch: int, max_micro_batch: Optional[int] = None,
                 warmup_steps: int = 0):
        self.global_batch = _at_least(global_batch, 1, "the global batch size",
                                      "pass --global-batch-size 1 or more")
        self.max_micro_batch = _max_micro(max_micro_batch)
        self.warmup_steps = _at_least(warmup_steps, 0, "the warm-up steps")

    def plan(self, world_size: int) -> BatchPlan:
        world_size = _at_least(world_size, 1, "the world size")
        if self.global_batch < world_size:
            raise BatchPolicyError(
                f"global batch {self.global_batch} is smaller than the world of {world_size} "
                f"workers; raise --global-batch-size or use fewer workers")
        return _make_plan(_split(self.global_batch, world_size), self.max_micro_batch,
                          lr_factor=1.0, scale=1.0, policy=self.name,
                          warmup_steps=self.warmup_steps)


class _PerWorkerBatch(BatchPolicy):
    """Per-worker batch fixed, global batch = per_worker_batch * world_size.

    reference_world: the world size the base learning rate was tuned for; the scale S is
    world_size / reference_world (the global batch over the reference global batch).
    """

    def __init__(self, per_worker_batch: int, reference_world: int = 1, warmup_steps: int = 0,
                 max_micro_batch: Optional[int] = None):
        self.per_worker_batch = _at_least(per_worker_batch, 1, "the per-worker batch size")
        self.reference_world = _at_least(reference_world, 1, "the reference world size")
        self.warmup_steps = _at_least(warmup_steps, 0, "the warm-up steps")
        self.max_micro_batch = _max_micro(max_micro_batch)

    @property
    def reference_global_batch(self) -> int:
        return self.per_worker_batch * self.reference_world

    def plan(self, world_size: int) -> BatchPlan:
        world_size = _at_least(world_size, 1, "the world size")
        scale = world_size / self.reference_world
        return _make_plan((self.per_worker_batch,) * world_size, self.max_micro_batch,
                          lr_factor=self._lr_factor(scale), scale=scale, policy=self.name,
                          warmup_steps=self.warmup_steps)

    @abc.abstractmethod
    def _lr_factor(self, scale: float) -> float:
        ...


class LinearScaling(_PerWorkerBatch):
    """"linear" (Goyal et al. 2017): lr_factor = world_size / reference_world."""

    name = "linear"

    def _lr_factor(self, scale: float) -> float:
        return scale


class SqrtScaling(_PerWorkerBatch):
    """"sqrt" (for the Adam family): lr_factor = sqrt(global batch / reference global batch)."""

    name = "sqrt"

    def _lr_factor(self, scale: float) -> float:
        return math.sqrt(scale)


class AdaScale(_PerWorkerBatch):
    """"adascale" (Johnson et al. 2020): lr_factor 1.0 in the plan; the learning rate is scaled by
    the gain that `elastic.adascale.AdaScaleGain` measures at the plan's scale, and the base
    schedule advances in scale-invariant iterations."""

    name = "adascale"

    def _lr_factor(self, scale: float) -> float:
        return 1.0


def make_policy(name: str, *, global_batch: Optional[int] = None,
                per_worker_batch: Optional[int] = None, reference_world: int = 1,
                max_micro_batch: Optional[int] = None, warmup_steps: int = 0) -> BatchPolicy:
    """The policy called `name`, from command-line settings.

    `fixed` needs the global batch. The others need the per-worker batch, or a global batch that
    divides by reference_world (per-worker = global / reference_world). When both are given they
    must agree: global = per-worker * reference_world.

    Raises:
        BatchPolicyError: unknown name, or settings that do not fit together.
    """
    key = (name or "").strip().lower()
    if key not in POLICY_NAMES:
        raise BatchPolicyError(f"unknown batch policy {name!r}; choose one of: "
                               f"{', '.join(POLICY_NAMES)}")
    reference_world = _at_least(reference_world, 1, "the reference world size")
    if global_batch is not None and per_worker_batch is not None \
            and global_batch != per_worker_batch * reference_world:
        raise BatchPolicyError(
            f"global batch {global_batch} and per-worker batch {per_worker_batch} disagree for a "
            f"reference world of {reference_world} ({per_worker_batch} x {reference_world} = "
            f"{per_worker_batch * reference_world}); give only one of them")
    if key == "fixed":
        if global_batch is None:
            raise BatchPolicyError("the fixed batch policy needs a global batch size; "
                                   "pass --global-batch-size")
        return FixedBatch(global_batch, max_micro_batch, warmup_steps)
    if per_worker_batch is None:
        if global_batch is None:
            raise BatchPolicyError(f"the {key} batch policy needs a per-worker batch size or a "
                                   f"global batch size (pass --global-batch-size)")
        _at_least(global_batch, 1, "the global batch size", "pass --global-batch-size 1 or more")
        if global_batch % reference_world:
            raise BatchPolicyError(
                f"the {key} policy keeps the per-worker batch fixed, but global batch "
                f"{global_batch} does not divide by the reference world of {reference_world}; "
                f"use a multiple of {reference_world} or give the per-worker batch size")
        per_worker_batch = global_batch // reference_world
    cls = {"linear": LinearScaling, "sqrt": SqrtScaling, "adascale": AdaScale}[key]
    return cls(per_worker_batch, reference_world, warmup_steps, max_micro_batch)


def valid_global_batches(max_global_batch: int, micro_batches: Sequence[int], min_world: int,
                         max_world: int) -> List[Tuple[int, List[int]]]:
    """Global batches up to max_global_batch that world * micro * accum can make, best first.

    A global batch is valid for a world size when some allowed micro-batch and an integer number
    of accumulation steps make it exactly. Candidates are ordered by how many world sizes in
    [min_world, max_world] they are valid for, then by size (larger first); each comes with those
    world sizes.

    Raises:
        BatchPolicyError: bad bounds, or no batch can be made at all.
    """
    _at_least(max_global_batch, 1, "the maximum global batch size")
    micros = sorted(set(_at_least(m, 1, "an allowed micro-batch size") for m in micro_batches))
    if not micros:
        raise BatchPolicyError("no allowed micro-batch sizes given; give at least one")
    _at_least(min_world, 1, "the minimum world size")
    _at_least(max_world, 1, "the maximum world size")
    if min_world > max_world:
        raise BatchPolicyError(f"minimum world size {min_world} is above the maximum {max_world}")
    worlds_of: Dict[int, set] = {}
    for world in range(min_world, max_world + 1):
        for micro in micros:
            step = world * micro
            for batch in range(step, max_global_batch + 1, step):
                worlds_of.setdefault(batch, set()).add(world)
    if not worlds_of:
        raise BatchPolicyError(
            f"no global batch up to {max_global_batch} can be made from micro-batches {micros} "
            f"on {min_world} to {max_world} workers; raise the maximum global batch or allow "
            f"smaller micro-batches")
    ranked = sorted(worlds_of.items(), key=lambda kv: (-len(kv[1]), -kv[0]))
    return [(batch, sorted(worlds)) for batch, worlds in ranked]


def best_global_batch(max_global_batch: int, micro_batches: Sequence[int], min_world: int,
                      max_world: int) -> Tuple[int, List[int]]:
    """The first of `valid_global_batches`: the largest batch valid for the most world sizes."""
    return valid_global_batches(max_global_batch, micro_batches, min_world, max_world)[0]


def _make_plan(shares: Sequence[int], max_micro: Optional[int], *, lr_factor: float,
               scale: float, policy: str, warmup_steps: int) -> BatchPlan:
    accum = 1 if max_micro is None else -(-max(shares) // max_micro)
    return BatchPlan(world_size=len(shares), global_batch=sum(shares),
                     micro_batches=tuple(_split(s, accum) for s in shares), accum_steps=accum,
                     lr_factor=lr_factor, scale=scale, policy=policy, warmup_steps=warmup_steps)


def _read_env(env: Mapping[str, str], name: str, parse):
    try:
        return parse(env[name])
    except (KeyError, ValueError) as exc:
        found = "missing" if name not in env else f"{env[name]!r}"
        raise BatchPolicyError(
            f"the batch plan in the environment is malformed: {name} is {found}; the launcher "
            f"writes it, so start workers with `python -m elastic.run` and leave ELASTIC_* "
            f"variables alone") from exc


def _split(total: int, parts: int) -> Tuple[int, ...]:
    """`total` in `parts` sizes at most one apart, larger first."""
    base, extra = divmod(total, parts)
    return tuple(base + 1 if i < extra else base for i in range(parts))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _at_least(value: object, minimum: int, what: str, hint: str = "") -> int:
    """`value` as an int, or a BatchPolicyError naming `what` and how to fix it."""
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        hint = hint or f"give {minimum} or more"
        raise BatchPolicyError(f"{what} must be an integer >= {minimum}, got {value!r}; {hint}")
    return int(value)  # type: ignore[call-overload]


def _max_micro(value: Optional[int]) -> Optional[int]:
    return None if value is None else _at_least(
        value, 1, "the maximum micro-batch", "give 1 or more, or leave it unset for no limit")
