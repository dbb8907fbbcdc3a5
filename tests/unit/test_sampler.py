import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from elastic.sampler import ElasticSampler, collate_or_none, even_split


def world(n, global_batch, world_size, rank_batches=None, **kwargs):
    """One sampler per rank of a world, as each worker process would build it."""
    samplers = [ElasticSampler(n, global_batch, rank=r, world_size=world_size, **kwargs)
                for r in range(world_size)]
    if rank_batches is not None:
        for r, s in enumerate(samplers):
            s.set_world(r, world_size, global_batch, rank_batches)
    return samplers


def step(samplers):
    """One optimizer step of every rank: their shares, then advance."""
    shares = [s.step_indices() for s in samplers]
    for s in samplers:
        s.advance()
    return shares


def flat(shares):
    return [i for share in shares for i in share]


def resume(n, global_batch, world_size, state, **kwargs):
    """A new world after a restart: fresh processes that load the committed state."""
    samplers = world(n, global_batch, world_size, **kwargs)
    for s in samplers:
        s.load_state_dict(state)
    return samplers


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n,global_batch", [(23, 5), (20, 5), (7, 7), (10, 12)])
def test_every_index_once_per_epoch(world_size, n, global_batch):
    if global_batch < world_size:
        pytest.skip("an even split needs a sample per rank")
    samplers = world(n, global_batch, world_size, seed=3)
    for epoch in range(2):
        for s in samplers:
            s.set_epoch(epoch)
        seen = []
        while len(samplers[0]):
            seen += flat(step(samplers))
        assert sorted(seen) == list(range(n))


def test_uneven_rank_batches_take_consecutive_slices():
    samplers = world(17, 6, 3, rank_batches=[3, 0, 3], seed=1)
    seen = []
    while len(samplers[0]):
        whole = samplers[0].global_indices()
        shares = step(samplers)
        assert flat(shares) == whole  # rank order, no gaps
        assert len(shares[1]) == 0
        seen += whole
    assert sorted(seen) == list(range(17))


def test_last_partial_batch_clips_slices_and_some_ranks_get_nothing():
    samplers = world(10, 8, 4, seed=0)
    step(samplers)
    assert samplers[0].step_global_batch() == 2
    assert [len(s.step_indices()) for s in samplers] == [2, 0, 0, 0]
    assert [len(b) for b in samplers[3]] == [0]  # the step exists for every rank
    assert collate_or_none([]) is None


def test_drop_last_skips_the_short_batch():
    s = ElasticSampler(10, 4, rank=0, world_size=1, drop_last=True)
    assert len(s) == 2 and len(list(s)) == 2


def test_world_changes_mid_epoch_cover_the_epoch_once():
    n, seen = 101, []
    samplers = world(n, 9, 3, seed=7)
    for _ in range(4):
        seen += flat(step(samplers))
    samplers[0].commit()
    state = samplers[0].state_dict()

    samplers = resume(n, 8, 2, state, seed=7)  # another world and another global batch
    for _ in range(3):
        seen += flat(step(samplers))
    samplers[0].commit()

    samplers = resume(n, 10, 5, samplers[0].state_dict(), rank_batches=[4, 1, 1, 1, 3], seed=7)
    while len(samplers[0]):
        seen += flat(step(samplers))
    samplers[0].commit()
    assert sorted(seen) == list(range(n))
    assert sorted(samplers[0].committed_indices()) == list(range(n))


def test_rollback_then_new_world_commits_a_permutation():
    n = 50
    samplers = world(n, 6, 3, seed=2)
    for _ in range(2):
        step(samplers)
    for s in samplers:
        s.commit()
    for _ in range(3):  # trained, never committed: lost with the failure
        step(samplers)
    for s in samplers:
        s.rollback()
    assert samplers[0].position == samplers[0].cursor == 12

    samplers = resume(n, 4, 2, samplers[0].state_dict(), seed=2)
    while len(samplers[0]):
        step(samplers)
    samplers[0].commit()
    committed = samplers[0].committed_indices()
    assert len(committed) == n and sorted(committed) == list(range(n))


def test_iteration_does_not_move_positions_and_stops_after_rollback():
    s = ElasticSampler(20, 4, rank=0, world_size=2)
    it = iter(s)
    first = next(it)
    assert s.position == 0 and first == s.step_indices()
    s.advance()
    assert next(it) == s.step_indices()  # the iterator is not affected by advance()
    s.rollback()
    assert list(it) == []  # stale after a rollback; a new iteration starts at the cursor
    assert next(iter(s)) == first


def test_set_epoch_keeps_the_current_epoch_and_resets_another():
    s = ElasticSampler(20, 4, rank=0, world_size=1, seed=5)
    s.advance()
    s.commit()
    s.set_epoch(0)
    assert s.cursor == 4
    s.set_epoch(1)
    assert (s.epoch, s.cursor, s.position) == (1, 0, 0)
    with pytest.raises(RuntimeError, match="no step left"):
        for _ in range(6):
            s.advance()


def test_state_dict_round_trip():
    a = ElasticSampler(30, 4, rank=1, world_size=2, seed=9)
    a.set_epoch(3)
    a.advance()
    a.advance()
    a.commit()
    a.advance()  # in flight only: not part of the state
    b = ElasticSampler(30, 6, rank=0, world_size=3, seed=0)
    b.load_state_dict(a.state_dict())
    assert (b.epoch, b.cursor, b.position, b.seed) == (3, 8, 8, 9)
    assert b.committed_indices() == a.committed_indices()
    assert b.global_batch == 6  # the world's own plan stays


def test_state_from_another_dataset_is_refused():
    state = ElasticSampler(30, 4, rank=0, world_size=1).state_dict()
    with pytest.raises(ValueError, match="dataset of 30 samples, but this dataset has 31"):
        ElasticSampler(31, 4, rank=0, world_size=1).load_state_dict(state)


def test_bad_worlds_are_refused():
    with pytest.raises(ValueError, match="smaller than the world size"):
        ElasticSampler(10, 2, rank=0, world_size=3)
    with pytest.raises(ValueError, match="sum to 5, not to the global batch 6"):
        ElasticSampler(10, 6, rank=0, world_size=2).set_world(0, 2, 6, [2, 3])
    with pytest.raises(ValueError, match="outside a world"):
        ElasticSampler(10, 6, rank=2, world_size=2)


def test_rank_and_world_default_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    s = ElasticSampler(10, 3)
    assert (s.rank, s.world_size, s.rank_batches) == (2, 3, [1, 1, 1])


def test_set_plan_takes_a_batch_plan():
    class Plan:  # the part of elastic.policy.BatchPlan the sampler reads
        world_size, global_batch = 3, 7

        def rank_batch(self, rank):
            return [3, 2, 2][rank]

    s = ElasticSampler(20, 4, rank=0, world_size=1)
    s.set_plan(Plan(), rank=1)
    assert (s.world_size, s.global_batch, s.step_indices() == s.global_indices()[3:5]) == (
        3, 7, True)


def test_same_seed_same_permutation_on_every_rank():
    for epoch in range(3):
        ranks = world(40, 8, 4, seed=11)
        for s in ranks:
            s.set_epoch(epoch)
        assert all(s.global_indices() == ranks[0].global_indices() for s in ranks)
        assert ranks[0].global_indices() != sorted(ranks[0].global_indices())  # shuffled
    assert ElasticSampler(40, 8, seed=12).global_indices() != ranks[0].global_indices()
    assert ElasticSampler(40, 8, shuffle=False).global_indices() == list(range(8))
    assert even_split(7, 3) == [3, 2, 2]


def test_dataloader_with_worker_processes_loads_the_expected_indices():
    n = 37
    dataset = TensorDataset(torch.arange(n) * 10)
    samplers = world(n, 6, 2, seed=4)
    loaders = [DataLoader(dataset, batch_sampler=s, num_workers=2, collate_fn=collate_or_none)
               for s in samplers]
    iterators = [iter(loader) for loader in loaders]
    seen = []
    while len(samplers[0]):
        expected = [s.step_indices() for s in samplers]
        for it, want, s in zip(iterators, expected, samplers):
            batch = next(it)
            got = [] if batch is None else (batch[0] // 10).tolist()
            assert got == want
            s.advance()
            seen += got
    for it in iterators:
        assert next(it, "end") == "end"
    assert sorted(seen) == list(range(n))
