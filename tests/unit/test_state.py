import os

import pytest
import torch
from torch import nn

from elastic import checkpoint
from elastic.checkpoint import (
    AsyncCheckpointer, CheckpointCorrupted, CheckpointError, CheckpointMismatch, load_checkpoint,
    model_fingerprint, save_checkpoint,
)
from elastic.sampler import ElasticSampler
from elastic.state import ElasticState

N = 64


def make_state(seed=0, hidden=8, **fields):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    sampler = ElasticSampler(N, 8, rank=0, world_size=1, seed=1)
    fields = fields or {"step": 0, "epoch": 0}
    return ElasticState(model, optimizer, sampler=sampler, scheduler=scheduler, **fields)


def train(state, steps):
    data = torch.arange(N * 4, dtype=torch.float32).reshape(N, 4) / (N * 4)
    for _ in range(steps):
        x = data[state.sampler.step_indices()]
        state.optimizer.zero_grad()
        state.model(x).pow(2).mean().backward()
        state.optimizer.step()
        state.scheduler.step()
        state.sampler.advance()
        state.step += 1


def snapshot(state):
    """Everything restore/load must bring back, as comparable values."""
    opt = state.optimizer.state_dict()
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "momentum": [opt["state"][i]["momentum_buffer"].clone() for i in sorted(opt["state"])],
        "lr": state.scheduler.get_last_lr(),
        "sampler": (state.sampler.epoch, state.sampler.position, state.sampler.cursor),
        "fields": state.fields,
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key == "model":
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x), key
        elif key == "momentum":
            assert len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y)), key
        else:
            assert x == y, key


def test_commit_restore_round_trip():
    state = make_state()
    train(state, 3)
    state.commit()
    committed = snapshot(state)
    train(state, 2)
    assert snapshot(state)["sampler"] != committed["sampler"]
    state.restore()
    assert_same(snapshot(state), committed)
    # The snapshot is not aliased by the live optimizer: training on and restoring again works.
    train(state, 2)
    state.restore()
    assert_same(snapshot(state), committed)


def test_commit_reuses_its_buffers():
    state = make_state()
    train(state, 1)
    state.commit()
    before = {k: v.data_ptr() for k, v in state.state_dict()["model"].items()}
    train(state, 1)
    state.commit()
    assert before == {k: v.data_ptr() for k, v in state.state_dict()["model"].items()}


def test_user_fields_are_attributes_and_must_be_declared():
    state = make_state(step=5, epoch=1, best=[1.0])
    state.step += 1
    assert (state.step, state.epoch, state.best) == (6, 1, [1.0])
    with pytest.raises(AttributeError, match="declare it as a keyword"):
        state.stepp = 3
    with pytest.raises(ValueError, match="collides"):
        make_state(commit=1)


def test_save_load_resumes_at_the_same_step_and_position(tmp_path):
    state = make_state()
    train(state, 3)
    state.commit()
    committed = snapshot(state)
    train(state, 1)  # not committed: not in the checkpoint
    state.save(tmp_path / "ckpt.pt")

    fresh = make_state(seed=99)
    fresh.load(tmp_path / "ckpt.pt")
    assert_same(snapshot(fresh), committed)
    assert fresh.step == 3 and fresh.sampler.position == 24
    state.restore()  # both continue from the committed state alike
    train(state, 2)
    train(fresh, 2)
    assert_same(snapshot(fresh), snapshot(state))


@pytest.mark.parametrize("where", ["payload", "header", "trailer"])
def test_flipped_bytes_are_detected(tmp_path, where):
    path = tmp_path / "ckpt.pt"
    make_state().save(path)
    data = bytearray(path.read_bytes())
    index = {"payload": len(data) // 2, "header": 8 + 4 + 4 + 8 + 3, "trailer": -2}[where]
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupted, match="is corrupted .*restore an older one"):
        make_state().load(path)


@pytest.mark.parametrize("cut", [lambda n: 10, lambda n: n // 2, lambda n: n - 1],
                         ids=["inside-header", "half", "last-byte"])
def test_truncated_checkpoint_is_detected(tmp_path, cut):
    path = tmp_path / "ckpt.pt"
    make_state().save(path)
    data = path.read_bytes()
    size = cut(len(data))
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointCorrupted, match=rf"{path} is truncated \(.*found {size}\b"):
        make_state().load(path)
    if size > 100:
        with pytest.raises(CheckpointCorrupted, match=rf"expected {len(data)} bytes, found"):
            load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointCorrupted, match="not a checkpoint written by elastic"):
        load_checkpoint(path)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    make_state(hidden=8).save(path)
    with pytest.raises(CheckpointMismatch, match=f"{path} was written for another model"):
        make_state(hidden=16).load(path)


def test_fingerprint_depends_on_structure_not_values():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    assert model_fingerprint(a) == model_fingerprint(b.state_dict())
    assert model_fingerprint(a) != model_fingerprint(nn.Linear(3, 3))
    assert model_fingerprint(a) != model_fingerprint(a.double())


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    state = make_state()
    state.save(path)
    good = path.read_bytes()
    train(state, 2)
    state.commit()

    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)  # some bytes reach the temporary file first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        state.save(path)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert path.read_bytes() == good
    make_state().load(path)


def test_async_save_equals_the_committed_state(tmp_path):
    state = make_state()
    train(state, 3)
    state.commit()
    committed = snapshot(state)
    state.save(tmp_path / "a.pt", asynchronous=True)
    train(state, 2)
    state.commit()  # writes into the snapshot's buffers while the save may still run
    state.wait_for_save()
    fresh = make_state(seed=5)
    fresh.load(tmp_path / "a.pt")
    assert_same(snapshot(fresh), committed)
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_async_errors_surface_on_the_next_call(tmp_path):
    saver = AsyncCheckpointer()
    (tmp_path / "a-file").write_text("")  # a directory cannot be made under a file
    saver.save(tmp_path / "a-file" / "x.pt", {"a": torch.ones(2)}, fingerprint="f")
    with pytest.raises(CheckpointError, match="asynchronous save of checkpoint .*x.pt failed"):
        saver.wait()
    saver.save(tmp_path / "ok.pt", {"a": torch.ones(2)}, fingerprint="f")
    saver.close()
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt", fingerprint="f")["a"], torch.ones(2))
    with pytest.raises(CheckpointError, match="closed"):
        saver.save(tmp_path / "ok.pt", {}, fingerprint="f")


def test_save_checkpoint_replaces_atomically(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"v": 1}, fingerprint="m")
    save_checkpoint(path, {"v": 2}, fingerprint="m")
    assert load_checkpoint(path)["v"] == 2
    assert os.listdir(tmp_path) == ["c.pt"]


def test_payload_of_many_pieces_is_verified_piece_by_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "PIECE", 1000)  # a small model then spans many pieces
    path = tmp_path / "ckpt.pt"
    state = make_state()
    train(state, 2)
    state.commit()
    state.save(path)
    assert path.stat().st_size > 5 * 1000
    fresh = make_state(seed=3)
    fresh.load(path)
    assert_same(snapshot(fresh), snapshot(state))
    data = bytearray(path.read_bytes())
    data[3 * 1000 + 500] ^= 0x01  # one bit in a middle piece
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupted, match="is corrupted"):
        fresh.load(path)


def test_restore_drops_the_gradients_of_rolled_back_steps():
    model = torch.nn.Linear(3, 1)
    state = ElasticState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state.commit()
    model(torch.ones(2, 3)).sum().backward()  # a step interrupted after its backward
    state.restore()
    assert all(p.grad is None for p in model.parameters())
