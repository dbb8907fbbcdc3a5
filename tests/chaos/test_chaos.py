"""Training through a seeded schedule of faults: joins, SIGKILLs, SIGTERMs, hung ranks, etcd
restarts (and preemption notices when the launcher has --preemption-file).

The job: a real etcd on its own data dir (so it can be restarted), agents of 1 worker each
(--nnodes 1:3, --max-restarts 100, --hang-timeout 4) training
tests/integration/scripts/fixed_train.py under the `fixed` batch policy, paced so that faults
land while it trains (tests/chaos/job.py). Invariants: the job finishes; every epoch's surviving
samples are the dataset exactly once, each surviving record being the sampler's share for its
rank and world (tests/chaos/history.py); the parameters equal an undisturbed run's; no process
outlives the job; every fault shows in the event log.

    python -m pytest tests/chaos -m chaos -s                      # CI: 6 faults, seed 1
    CHAOS_FAULTS=100 python -m pytest tests/chaos -m chaos -s     # the soak (CHAOS_SEED: 1)

The number of epochs grows with CHAOS_FAULTS so that training outlasts the faults: the soak of
100 takes about ten minutes on two cores, the default run about one. With -s the figures are
printed; with CHAOS_REPORT=path they are also written there as JSON. A failure names the
directory holding every agent's output, the event log and the per-step records.
"""
import json
import os
import time
import uuid

import psutil
import pytest
import torch

from tests.support import parameter_differences
from tests.integration.agents import Agent, new_mark, processes_with_mark, read_events, wait_for
from tests.integration.test_training_semantics import surviving_steps

from . import analysis
from . import schedule as sched
from .history import Prescription, audit, round_worlds
from .job import (DATASET, GLOBAL_BATCH, MAX_MICRO_BATCH, SAMPLER_SEED, SCRIPT, STEPS_PER_EPOCH,
                  ChaosJob, epochs_for, launcher_has)

FAULTS = int(os.environ.get("CHAOS_FAULTS", "6"))
SEED = int(os.environ.get("CHAOS_SEED", "1"))
REPORT = os.environ.get("CHAOS_REPORT")

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def reference_params(tmp, endpoint, run_id, epochs, mark):
    """The same training in one undisturbed process."""
    tmp.mkdir()
    (tmp / "records").mkdir()
    (tmp / "allowance").write_text(str(10**9))
    agent = Agent(["--nnodes", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                   "--global-batch-size", GLOBAL_BATCH, "--max-micro-batch", MAX_MICRO_BATCH,
                   SCRIPT, "--checkpoint", tmp / "state.ckpt", "--out", tmp / "params.pt",
                   "--record-dir", tmp / "records", "--allowance-file", tmp / "allowance",
                   "--epochs", epochs, "--dataset", DATASET, "--step-sleep", 0],
                  tmp, "reference", mark)
    try:
        assert agent.wait(60 + 2 * epochs) == 0, agent.output()[-3000:]
    finally:
        agent.stop()
    return torch.load(tmp / "params.pt")


@pytest.mark.timeout(300 + 60 * FAULTS)
def test_training_survives_a_seeded_schedule_of_faults(tmp_path):
    preempt = launcher_has("--preemption-file")
    kinds = [k for k in sched.ALL_KINDS if k != sched.PREEMPT or preempt]
    plan = sched.make_schedule(SEED, FAULTS, kinds)
    epochs = epochs_for(FAULTS)
    print(f"\nchaos: seed {SEED}, {FAULTS} faults, {epochs} epochs, files under {tmp_path}")
    print("  schedule: " + ", ".join(f"{f.kind} {f.target or ''}".strip() for f in plan.faults))
    if not preempt:
        print("  preempt left out: the launcher has no --preemption-file")
    run_id, mark = "chaos-" + uuid.uuid4().hex[:8], new_mark()
    job = ChaosJob(tmp_path / "job", run_id, mark, plan, epochs, preemption_files=preempt)
    started = time.time()
    try:
        job.start_etcd()
        expected = reference_params(tmp_path / "reference", job.endpoint, run_id + "-ref", epochs,
                                    mark)
        job.start()
        job.run_faults()
        codes = job.finish(timeout=120 + 0.2 * epochs * DATASET / GLOBAL_BATCH)
        assert set(codes.values()) == {0}, f"the job did not finish: {codes}\n{job.evidence()}"
    finally:
        job.close()
    # Every invariant is checked, so that one broken does not hide another.
    broken = []
    try:
        wait_for(lambda: processes_with_mark(mark) == [], timeout=15, what="the job's processes")
    except AssertionError:
        broken.append(f"processes outlived the job: {describe(processes_with_mark(mark))}")
    events = read_events(job.logs)
    final, attempts = surviving_steps(job.records)
    history = audit(final, round_worlds(events), epochs, STEPS_PER_EPOCH,
                    Prescription(DATASET, GLOBAL_BATCH, MAX_MICRO_BATCH, SAMPLER_SEED))
    broken += history.problems[:10]
    if len(history.problems) > 10:
        broken.append(f"... and {len(history.problems) - 10} more records off the sampler's shares")
    if history.lost or history.duplicated:
        broken.append(f"samples lost: {history.lost}, trained twice in an epoch: "
                      f"{history.duplicated}")
    broken += [f"parameters differ from the undisturbed run's: {p}"
               for p in parameter_differences(torch.load(job.params), expected)]
    broken += [f"not in the event log: {m}" for m in analysis.unlogged(job.injected, events)]

    fig = analysis.figures(job.injected, job.rank0_steps(), attempts, history, events)
    fig.update(seed=SEED, wall_s=round(time.time() - started, 1), exit_codes=codes,
               invariants_broken=broken)
    print(analysis.describe(fig))
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(fig, f, indent=2)
    assert not broken, "\n".join(broken) + f"\nfiles under {tmp_path}"


def describe(processes):
    out = []
    for p in processes:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return out
