import os
import threading
from pathlib import Path

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


def test_after_load_training_on_and_restoring_brings_back_the_checkpoint(tmp_path, monkeypatch):
    """load() copies the optimizer's part of the snapshot on a thread: a step taken before that
    copy is made waits for it, so it cannot write into the snapshot; and the loaded state does
    not depend on the file (rewritten in place at once here)."""
    state = make_state()
    train(state, 3)
    state.commit()
    committed = snapshot(state)
    path = tmp_path / "ckpt.pt"
    state.save(path)

    from elastic import state as state_module
    release = threading.Event()
    clone = state_module._clone

    def clone_later_in_the_background(obj):
        if threading.current_thread().name == "elastic-state-copy":
            assert release.wait(10)
        return clone(obj)

    monkeypatch.setattr(state_module, "_clone", clone_later_in_the_background)
    fresh = make_state(seed=99)
    fresh.load(path)
    path.write_bytes(b"rewritten in place")
    assert_same(snapshot(fresh), committed)
    stepping = threading.Thread(target=train, args=(fresh, 2))
    stepping.start()
    stepping.join(0.5)
    assert stepping.is_alive(), "the optimizer stepped before the snapshot was copied"
    release.set()
    stepping.join(10)
    assert fresh.step == 5
    fresh.restore()
    assert_same(snapshot(fresh), committed)


def _digest_offset(data: bytes) -> int:
    return data.rindex(b'"digest": "') + len(b'"digest": "') + 3


@pytest.mark.parametrize("checksum", ["xxh3", "crc32", "sha256"])
@pytest.mark.parametrize("where, message", [
    (lambda data: len(data) // 2, "is corrupted .*checksums do not match"),
    (lambda data: 40, "is corrupted .*checksums do not match"),  # inside torch's first record
    (_digest_offset, "is corrupted .*checksums do not match"),
    (lambda data: data.rindex(b'"payload": ') + 12, "is corrupted .*expected"),
    (lambda data: data.rindex(b"ELCKPT2") + 2, "is corrupted .*trailer cannot be read"),
    (lambda data: len(data) - 2, "is truncated, or not a checkpoint"),
], ids=["payload", "payload-start", "digest", "length", "trailer-start", "end-marker"])
def test_flipped_bytes_are_detected(tmp_path, checksum, where, message):
    path = tmp_path / "ckpt.pt"
    make_state().save(path, checksum=checksum)
    data = bytearray(path.read_bytes())
    data[where(data)] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupted, match=f"{message}.*restore an older one"):
        make_state().load(path)


@pytest.mark.parametrize("cut", [lambda n: 10, lambda n: n // 2, lambda n: n - 1],
                         ids=["start", "half", "last-byte"])
def test_truncated_checkpoint_is_detected(tmp_path, cut):
    path = tmp_path / "ckpt.pt"
    make_state().save(path)
    data = path.read_bytes()
    size = cut(len(data))
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointCorrupted,
                       match=rf"{path} is truncated, or not a checkpoint .*\(found {size} bytes"):
        make_state().load(path)


def test_a_checkpoint_is_a_torch_archive_that_plain_torch_load_reads(tmp_path):
    """No lock-in: the payload starts the file, so torch.load (mapped or not) reads it."""
    path = tmp_path / "ckpt.pt"
    state = make_state()
    state.save(path)
    for mmap in (False, True):
        plain = torch.load(path, weights_only=True, mmap=mmap)
        assert torch.equal(plain["model"]["0.weight"], state.model[0].weight)


def test_format_1_checkpoints_are_still_read():
    """Written by the previous release: a header before the payload, SHA-256 pieces."""
    path = Path(__file__).parent / "data" / "checkpoint-v1.pt"
    state = load_checkpoint(path, fingerprint="v1-test")
    assert torch.equal(state["w"], torch.arange(6.).reshape(2, 3)) and state["step"] == 7
    with pytest.raises(CheckpointMismatch, match="written for another model"):
        load_checkpoint(path, fingerprint="other")


def test_format_1_damage_is_still_detected(tmp_path):
    data = bytearray((Path(__file__).parent / "data" / "checkpoint-v1.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    path = tmp_path / "v1.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupted, match="SHA-256 does not match"):
        load_checkpoint(path)
    path.write_bytes(bytes(data[:-5]))
    with pytest.raises(CheckpointCorrupted, match=r"is truncated \(expected \d+ bytes"):
        load_checkpoint(path)


def test_an_unknown_checksum_is_refused_before_any_file_is_made(tmp_path):
    with pytest.raises(ValueError, match="checksum must be one of xxh3, crc32, sha256, got 'md5'"):
        make_state().save(tmp_path / "c.pt", checksum="md5")
    with pytest.raises(ValueError, match="checksum must be one of"):
        make_state().save(tmp_path / "c.pt", asynchronous=True, checksum="md5")
    assert os.listdir(tmp_path) == []


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


def test_commits_while_an_async_save_writes_leave_its_snapshot_alone(tmp_path, monkeypatch):
    """The write is held back until two more steps are committed: the file still holds the
    state of the save, and the state holds the later commit."""
    release = threading.Event()
    real_save = checkpoint.save_checkpoint

    def held_save(*args, **kwargs):
        assert release.wait(30)
        real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", held_save)
    state = make_state()
    train(state, 3)
    state.commit()
    saved = snapshot(state)
    state.save(tmp_path / "a.pt", asynchronous=True)
    train(state, 2)
    state.commit()
    later = snapshot(state)
    release.set()
    state.wait_for_save()
    state.restore()
    assert_same(snapshot(state), later)
    fresh = make_state(seed=5)
    fresh.load(tmp_path / "a.pt")
    assert_same(snapshot(fresh), saved)
    assert fresh.step == 3 and state.step == 5
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]  # no temporary file left behind


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


@pytest.mark.parametrize("record", ["data.pkl", "tensor", "central directory"])
def test_torch_never_parses_a_damaged_record_and_damaged_tensor_bytes_are_caught(
        tmp_path, monkeypatch, record):
    """load() checks the tensors' bytes while torch.load copies them, but what torch.load parses
    (the pickle, the zip's directory) is checked before it runs."""
    import zipfile

    monkeypatch.setattr(checkpoint, "PIECE", 1000)  # many pieces: the overlap has work to do
    path = tmp_path / "ckpt.pt"
    state = make_state(hidden=512)  # its largest tensor's bytes span pieces of their own
    state.save(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos = {i.filename.split("/", 1)[1]: i for i in archive.infolist()}
        if record == "central directory":
            where = archive.start_dir + 50
        else:
            info = (infos["data.pkl"] if record == "data.pkl" else
                    max((i for n, i in infos.items() if n.startswith("data/")),
                        key=lambda i: i.compress_size))
            where = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    parsed = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: parsed.append(a) or real_load(*a, **k))
    with pytest.raises(CheckpointCorrupted, match="checksums do not match"):
        make_state(hidden=512).load(path)
    # A tensor's bytes are checked while torch.load copies them; what it parses, before.
    assert (parsed != []) == (record == "tensor"), "torch.load ran on unchecked parsed bytes"


def test_restore_drops_the_gradients_of_rolled_back_steps():
    model = torch.nn.Linear(3, 1)
    state = ElasticState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state.commit()
    model(torch.ones(2, 3)).sum().backward()  # a step interrupted after its backward
    state.restore()
    assert all(p.grad is None for p in model.parameters())
