import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from elastic.sampler import ElasticSampler
from elastic.state import ElasticState, StateSyncError
from launcher.network import free_port

pytestmark = pytest.mark.integration

WORLD = 3
TIMEOUT = timedelta(seconds=60)  # a hung collective fails the test instead of blocking it



def build(rank, hidden=16):
    torch.manual_seed(100 + rank)  # fresh ranks start from other weights than rank 0
    model = nn.Sequential(nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    sampler = ElasticSampler(200, 12, rank=rank, world_size=WORLD, seed=3)
    return ElasticState(model, optimizer, sampler=sampler, scheduler=scheduler,
                        step=0, epoch=0, note="fresh", mask=torch.zeros(3, dtype=torch.bool))


def train(state, steps):
    for _ in range(steps):
        x = torch.randn(8, 6)
        state.optimizer.zero_grad()
        state.model(x).square().mean().backward()
        state.optimizer.step()
        state.scheduler.step()
        state.sampler.advance()
        state.step += 1


def dump(state):
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "sampler": state.sampler.state_dict(),
            "position": state.sampler.position, "fields": state.fields}


def sync_worker(rank, port, out_dir, other_model_rank):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=TIMEOUT)
    try:
        state = build(rank, hidden=32 if rank == other_model_rank else 16)
        if rank == 0:  # the survivor: trained and committed, then steps it never committed
            state.sampler.set_epoch(2)
            train(state, 5)
            state.note, state.epoch = "trained", 2
            state.mask[1] = True
            state.commit()
            torch.save(dump(state), f"{out_dir}/committed.pt")
            train(state, 2)
        try:
            state.sync(src=0)
        except StateSyncError as exc:
            torch.save({"error": str(exc)}, f"{out_dir}/rank{rank}.pt")
        else:
            torch.save(dump(state), f"{out_dir}/rank{rank}.pt")
    finally:
        # Every rank reaches here alive; leaving together keeps a rank from tearing down its
        # gloo pairs while a peer still uses them (seen once under load: SIGABRT in teardown).
        dist.barrier()
        dist.destroy_process_group()
    # torch 2.13's gloo can still abort in interpreter teardown after all of the above ("terminate
    # called without an active exception", rank 0, once in CI); what this test checks is written
    # by now, so a rank that got here leaves without that teardown. A rank that raised does not.
    os._exit(0)


def run_world(tmp_path, other_model_rank=-1):
    mp.spawn(sync_worker, args=(free_port(), str(tmp_path), other_model_rank), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_new_ranks_receive_the_survivors_committed_state(tmp_path):
    ranks = run_world(tmp_path)
    committed = torch.load(tmp_path / "committed.pt", weights_only=False)
    assert committed["fields"]["step"] == 5 and committed["position"] == 60
    for rank, got in enumerate(ranks):
        # Every rank, the survivor included, ends at the committed state, not past it.
        assert_equal(got, committed, f"rank{rank}")
    assert ranks[1]["optimizer"]["state"][0]["exp_avg_sq"].abs().sum() > 0


def test_ranks_with_another_model_fail_together(tmp_path):
    ranks = run_world(tmp_path, other_model_rank=2)
    for got in ranks:
        assert "ranks [2] hold another model than rank 0" in got["error"]
