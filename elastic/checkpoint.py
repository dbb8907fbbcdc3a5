"""Checkpoint files: atomic writes, verified reads, model fingerprints, background writes.

A checkpoint file is a torch.save payload framed so that a reader can tell a complete file made
for this model from anything else:

    header   magic "ELCKPT\\x00\\x01" | format version u32 | fingerprint length u32 |
             payload length u64 | digest (32 bytes) | fingerprint (utf-8)
    payload  torch.save bytes
    trailer  magic "ELCKEND\\x00"

    digest = SHA-256(fingerprint + SHA-256(piece 0) + SHA-256(piece 1) + ...), where the pieces
    are the payload cut every 64 MiB: a hash list, so that a reader verifies the pieces on all
    cores at once (SHA-256 runs at about 1.5 GB/s per core; a restart waits for it).

It is written to a temporary file in the target's directory, fsynced and renamed over the target,
so a reader sees the old file or the new one, never a part; a failed write leaves the old one.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import secrets
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

MAGIC = b"ELCKPT\x00\x01"
TRAILER = b"ELCKEND\x00"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sIIQ32s")  # magic, version, fingerprint length, payload length, digest
PIECE = 64 << 20  # bytes per hashed piece of the payload; part of the format
# Threads verifying pieces on load: 8 hash at ~12 GB/s and hold at most 8 pieces in memory.
HASH_THREADS = 8


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class CheckpointCorrupted(CheckpointError):
    """The file is truncated, altered or not a checkpoint: it cannot be used."""


class CheckpointMismatch(CheckpointError):
    """The file is intact but was written for another model."""


def model_fingerprint(model_or_state_dict: Union[nn.Module, Mapping[str, Any]]) -> str:
    """A short hash of the names, shapes and dtypes (not values) of a model's state."""
    state = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
             else model_or_state_dict)
    lines = []
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            lines.append(f"{name}:{tuple(value.shape)}:{value.dtype}")
        else:
            lines.append(f"{name}:{type(value).__name__}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


class _CountingWriter:
    """What torch.save writes to: the file, counting bytes (torch may not seek or tell)."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self._file, self.written = file, 0

    def write(self, data: Any) -> int:
        count = self._file.write(data)
        self.written += count
        return count

    def flush(self) -> None:
        self._file.flush()


def _payload_digest(fd: int, start: int, length: int, fingerprint: bytes) -> bytes:
    """The digest of a payload on disk, its pieces read and hashed on several cores."""
    buffers = threading.local()

    def piece(offset: int) -> bytes:
        # One reused buffer per thread: a fresh 64 MiB allocation per piece costs page faults.
        if not hasattr(buffers, "data"):
            buffers.data = bytearray(PIECE)
        got = os.preadv(fd, [memoryview(buffers.data)[:min(PIECE, length - offset)]],
                        start + offset)
        # preadv and sha256 release the GIL, so the threads really run in parallel.
        return hashlib.sha256(memoryview(buffers.data)[:got]).digest()

    offsets = range(0, length, PIECE)
    threads = max(1, min(HASH_THREADS, os.cpu_count() or 1, len(offsets)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return hashlib.sha256(fingerprint + b"".join(pool.map(piece, offsets))).digest()


class _Window(io.RawIOBase):
    """A read-only view of bytes [start, start+length) of a file, for torch.load."""

    def __init__(self, file: io.BufferedReader, start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._length - self._pos)
        if want <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(view[:want])
        self._pos += got
        return got


def save_checkpoint(path: str, state: dict, *, fingerprint: str) -> None:
    """Write `state` to `path` atomically, framed with its length, hash and model fingerprint.

    Raises:
        OSError, or whatever torch.save raises; the previous file at `path` is then untouched
        and the temporary file removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fp = fingerprint.encode()
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # Not mkstemp: its files are private (0600); a checkpoint gets the umask's usual mode.
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # read back to hash
    try:
        with os.fdopen(fd, "wb") as file:
            # Room for the header; its length and hash are known only after the payload.
            file.write(bytes(_FIXED.size + len(fp)))
            writer = _CountingWriter(file)
            torch.save(state, writer)
            file.write(TRAILER)
            file.flush()
            # Hashed back from the page cache on several cores, rather than inline on one.
            digest = _payload_digest(file.fileno(), _FIXED.size + len(fp), writer.written, fp)
            file.seek(0)
            file.write(_FIXED.pack(MAGIC, FORMAT_VERSION, len(fp), writer.written, digest) + fp)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself must reach the disk, or a crash could bring back the old entry.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, *, fingerprint: Optional[str] = None, map_location: Any = "cpu",
                    weights_only: bool = True) -> dict:
    """Read a checkpoint written by save_checkpoint, after checking its length and hash.

    `weights_only` is passed to torch.load: the hash proves the file is intact, not that it
    comes from someone you trust, so arbitrary pickles stay off unless asked for.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointCorrupted: truncated, altered, or not a checkpoint.
        CheckpointMismatch: `fingerprint` is given and differs from the file's.
        CheckpointError: written by another format version.
    """
    path = os.fspath(path)
    advice = "it cannot be used — restore an older one or start fresh"
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        fixed = file.read(_FIXED.size)
        if len(fixed) < _FIXED.size:
            raise CheckpointCorrupted(f"checkpoint {path} is truncated (found {size} bytes, fewer "
                                      f"than its {_FIXED.size}-byte header); {advice}")
        magic, version, fp_len, payload_len, digest = _FIXED.unpack(fixed)
        if magic != MAGIC:
            raise CheckpointCorrupted(f"{path} is not a checkpoint written by elastic (its first "
                                      f"bytes are {magic!r}); {advice}")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format version {version}; this version "
                                  f"of elastic reads version {FORMAT_VERSION}")
        expected = _FIXED.size + fp_len + payload_len + len(TRAILER)
        if size < expected:
            raise CheckpointCorrupted(f"checkpoint {path} is truncated (expected {expected} bytes, "
                                      f"found {size}); {advice}")
        if size > expected:
            raise CheckpointCorrupted(f"checkpoint {path} is corrupted (expected {expected} bytes, "
                                      f"found {size}); {advice}")
        fp = file.read(fp_len)
        start = _FIXED.size + fp_len
        # Verified before torch.load: damaged bytes are never unpickled.
        actual = _payload_digest(file.fileno(), start, payload_len, fp)
        file.seek(start + payload_len)
        if file.read() != TRAILER or actual != digest:
            raise CheckpointCorrupted(f"checkpoint {path} is corrupted (its SHA-256 does not match "
                                      f"the one recorded when it was written); {advice}")
        saved_for = fp.decode(errors="replace")
        if fingerprint is not None and saved_for != fingerprint:
            raise CheckpointMismatch(
                f"checkpoint {path} was written for another model (fingerprint {saved_for}, this "
                f"model's is {fingerprint}: parameter names, shapes or dtypes differ); load it "
                "into the model it was saved from, or start fresh")
        # Unbuffered: torch reads whole records, an extra buffer would only add a copy.
        payload = _Window(file, start, payload_len)
        return torch.load(payload, map_location=map_location, weights_only=weights_only)


def _cpu_snapshot(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor copied to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class AsyncCheckpointer:
    """Writes checkpoints on a background thread, one at a time.

    `save()` copies the state's tensors to host memory on the caller's thread (so training may
    change them right away) and returns while a thread writes the copy. A save while a write is
    in flight *waits* for that write first rather than superseding it: every requested
    checkpoint lands, memory holds at most one extra copy, and a disk slower than the save
    rate slows training down instead of silently dropping checkpoints. A failed write is raised,
    as CheckpointError, by the next `save()` or `wait()`.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[tuple[str, BaseException]] = None
        self._closed = False

    def save(self, path: str, state: dict, *, fingerprint: str) -> None:
        """Snapshot `state` now and write it to `path` in the background."""
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed")
        self.wait()
        snapshot = _cpu_snapshot(state)
        self._thread = threading.Thread(
            target=self._write, args=(os.fspath(path), snapshot, fingerprint),
            name="elastic-checkpoint", daemon=False)  # not daemon: exit waits for the write
        self._thread.start()

    def _write(self, path: str, snapshot: dict, fingerprint: str) -> None:
        try:
            save_checkpoint(path, snapshot, fingerprint=fingerprint)
        except BaseException as exc:  # handed to the training thread by wait()
            self._failure = (path, exc)

    def wait(self) -> None:
        """Block until the write in flight, if any, has finished; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            path, exc = self._failure
            self._failure = None
            raise CheckpointError(f"asynchronous save of checkpoint {path} failed: {exc}") from exc

    def close(self) -> None:
        """Wait for the last write (raising its error) and refuse further saves."""
        self._closed = True
        self.wait()

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
