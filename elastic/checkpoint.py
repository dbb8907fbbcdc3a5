"""Checkpoint files: atomic writes, verified reads, model fingerprints, background writes.

A checkpoint file (format 2) is a plain torch.save archive with a trailer that tells a reader
whether the file is complete, intact and made for this model:

    payload  torch.save bytes, from offset 0, so torch.load can map the file (mmap=True)
    trailer  b"\nELCKPT2\n" | JSON | b"\n" | the JSON's length as 10 ASCII digits | b"ELCKEND\n"

    JSON     {"format": 2, "payload": bytes, "piece": bytes,
              "checksum": "xxh3" | "crc32" | "sha256",
              "fingerprint": model fingerprint, "digest": hex SHA-256 of (fingerprint +
              checksum(piece 0) + checksum(piece 1) + ...),
              "pieces": [hex checksum(piece 0), ...]}   (since 0.1.0; optional for readers)

The payload is cut into pieces (64 MiB) so that a reader checks them on all cores at once; the
writer checksums each piece as it writes it, on a second thread, so a save reads nothing back.
With each piece's checksum in the trailer (bound to it by the digest), a reader checks the pieces
holding what torch.load parses first and the tensors' bytes while torch.load copies them.
XXH3 (64-bit, the default) finds the damage disks and networks do at ~7 GB/s per core; CRC-32
(~1.5 GB/s, the default of earlier versions) is still read; SHA-256 (~1 GB/s) also resists
deliberate tampering. The trailer is ASCII: torch's zip reader looks for its end
record in the file's last bytes and must not find one in ours.

Format 1 (a binary header before the payload, SHA-256 only) is still read.

A checkpoint is written to a temporary file in the target's directory, fsynced and renamed over
the target, so a reader sees the old file or the new one, never a part; a failed write leaves
the old one.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import mmap
import os
import secrets
import struct
import threading
import time
import re
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Callable, List, Mapping, Optional, Union

import torch
import xxhash
from torch import nn

FORMAT_VERSION = 2
BEGIN = b"\nELCKPT2\n"
END = b"ELCKEND\n"
_LENGTH_DIGITS = 10
_TAIL = _LENGTH_DIGITS + len(END)
PIECE = 64 << 20  # bytes per checksummed piece of the payload (recorded in each file)
CHECKSUMS = ("xxh3", "crc32", "sha256")
DEFAULT_CHECKSUM = "xxh3"
# Threads verifying pieces on load (the pieces are mapped, not read into memory).
HASH_THREADS = 8
# Writes at least this large are checksummed on the second thread while this one writes them.
_OVERLAP_BYTES = 1 << 20

# Format 1: magic, version, fingerprint length, payload length, digest; then the fingerprint.
_V1_MAGIC = b"ELCKPT\x00\x01"
_V1_TRAILER = b"ELCKEND\x00"
_V1_FIXED = struct.Struct("<8sIIQ32s")


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


class _Crc32:
    """zlib.crc32 behind hashlib's update/digest (it releases the GIL on large buffers)."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: Any) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


def _hasher(checksum: str) -> Any:
    if checksum == "xxh3":
        return xxhash.xxh3_64()  # releases the GIL on large buffers, as zlib and hashlib do
    if checksum == "crc32":
        return _Crc32()
    if checksum == "sha256":
        return hashlib.sha256()
    raise ValueError(f"checksum must be one of {', '.join(CHECKSUMS)}, got {checksum!r}")


def _combine(fingerprint: bytes, pieces: List[bytes]) -> bytes:
    return hashlib.sha256(fingerprint + b"".join(pieces)).digest()


class _ChecksummingWriter:
    """What torch.save writes to: the file, each piece of the bytes checksummed on the way.

    torch may not seek or tell, and its buffers are valid only during write(): a large one is
    checksummed on a helper thread while this thread writes it, and both finish before write()
    returns (zlib, hashlib and the write release the GIL).
    """

    def __init__(self, file: io.BufferedWriter, checksum: str, piece: int,
                 helper: ThreadPoolExecutor) -> None:
        self._file, self._checksum, self._piece, self._helper = file, checksum, piece, helper
        self.written = 0
        self.pieces: List[bytes] = []
        self._hash = _hasher(checksum)
        self._filled = 0  # bytes of the current piece

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= _OVERLAP_BYTES:
            absorbed = self._helper.submit(self._absorb, view)
            try:
                count = self._file.write(view)
            finally:
                absorbed.result()
        else:
            self._absorb(view)
            count = self._file.write(view)
        self.written += count
        return count

    def flush(self) -> None:
        self._file.flush()

    def _absorb(self, view: memoryview) -> None:
        while len(view):
            part = view[:self._piece - self._filled]
            self._hash.update(part)
            self._filled += len(part)
            view = view[len(part):]
            if self._filled == self._piece:
                self._end_piece()

    def _end_piece(self) -> None:
        self.pieces.append(self._hash.digest())
        self._hash, self._filled = _hasher(self._checksum), 0

    def finish(self) -> List[bytes]:
        if self._filled:
            self._end_piece()
        return self.pieces


class _PayloadCheck:
    """The digest of a payload on disk, its pieces checksummed on several cores straight from
    the page cache (the file mapped, not copied: a copy costs more than the checksum).

    `first(pieces)` checks those pieces now; `start_rest()` checks the others on threads while
    the caller goes on; `digest()` waits for them and combines.
    """

    def __init__(self, fd: int, length: int, fingerprint: bytes, piece: int,
                 checksum: str, start: int = 0) -> None:
        self._start, self._length, self._fingerprint = start, length, fingerprint
        self._piece, self._checksum = piece, checksum
        self._count = -(-length // piece)
        self._digests: dict = {}
        self._mapped = (mmap.mmap(fd, start + length, access=mmap.ACCESS_READ) if length
                        else None)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(HASH_THREADS, os.cpu_count() or 1, self._count)))
        self._rest: list = []

    def _one(self, index: int) -> bytes:
        # The checksums release the GIL, so the threads really run in parallel.
        hasher = _hasher(self._checksum)
        begin = index * self._piece
        end = min(begin + self._piece, self._length)
        with memoryview(self._mapped) as view, \
                view[self._start + begin:self._start + end] as part:
            hasher.update(part)
        return hasher.digest()

    def first(self, indexes: Any, expected: List[bytes]) -> bool:
        """Check those pieces now; whether each matches its `expected` checksum."""
        chosen = sorted(i for i in set(indexes) if 0 <= i < self._count)
        self._digests.update(zip(chosen, self._pool.map(self._one, chosen)))
        return all(self._digests[i] == expected[i] for i in chosen)

    def start_rest(self) -> None:
        self._rest = [(i, self._pool.submit(self._one, i))
                      for i in range(self._count) if i not in self._digests]

    def digest(self) -> bytes:
        if not self._rest:
            self.start_rest()
        self._digests.update((i, future.result()) for i, future in self._rest)
        return _combine(self._fingerprint, [self._digests[i] for i in range(self._count)])

    def close(self) -> None:
        for _, future in self._rest:
            future.cancel()
        self._pool.shutdown(wait=True)
        if self._mapped is not None:
            self._mapped.close()


def _payload_digest(fd: int, start: int, length: int, fingerprint: bytes, piece: int,
                    checksum: str) -> bytes:
    """The digest of the payload [start, start+length) of a file, every piece at once (format 1:
    after its header)."""
    check = _PayloadCheck(fd, length, fingerprint, piece, checksum, start)
    try:
        return check.digest()
    finally:
        check.close()


# A torch archive's records that torch.load copies rather than parses: the tensors' bytes.
_STORAGE_RECORD = re.compile(r"(^|/)data/\d+$")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip local header: signature ... name, extra length


def _pieces(begin: int, end: int, piece: int) -> List[int]:
    return list(range(max(0, begin) // piece, (max(begin, end) - 1) // piece + 1))


def _parsed_records(file: Any, payload: int) -> Optional[tuple]:
    """(the archive's central directory as (begin, end), the parsed records as (header offset,
    size)): everything torch.load parses rather than copies, the tensors' bytes excepted. None
    when the archive cannot be read: then every piece is checked first."""
    try:
        with zipfile.ZipFile(_Window(file, 0, payload)) as archive:
            return ((archive.start_dir, payload),
                    [(info.header_offset, info.compress_size) for info in archive.infolist()
                     if not _STORAGE_RECORD.search(info.filename)])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        return None


def _record_spans(file: Any, records: List[tuple], payload: int) -> Optional[List[tuple]]:
    """Each record's whole extent, from its local header (already checked); None if a header
    is not one."""
    spans = []
    for offset, size in records:
        file.seek(offset)
        header = file.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            return None
        magic, name, extra = _LOCAL_HEADER.unpack(header)
        if magic != b"PK\x03\x04":
            return None
        spans.append((offset, min(payload, offset + _LOCAL_HEADER.size + name + extra + size)))
    return spans


class _Window(io.RawIOBase):
    """A read-only view of bytes [start, start+length) of a file, for torch.load (format 1)."""

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


def save_checkpoint(path: str, state: dict, *, fingerprint: str,
                    checksum: str = DEFAULT_CHECKSUM) -> None:
    """Write `state` to `path` atomically, with its length, checksums and model fingerprint.

    checksum: "xxh3" (the default: fastest; finds accidental damage), "crc32" (as earlier
    versions wrote) or "sha256" (also resists tampering).

    Raises:
        ValueError: an unknown checksum.
        OSError, or whatever torch.save raises; the previous file at `path` is then untouched
        and the temporary file removed.
    """
    _hasher(checksum)  # an unknown name fails before any file is made
    started = time.monotonic()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # Not mkstemp: its files are private (0600); a checkpoint gets the umask's usual mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file, ThreadPoolExecutor(1, "elastic-checksum") as helper:
            writer = _ChecksummingWriter(file, checksum, PIECE, helper)
            torch.save(state, writer)
            pieces = writer.finish()
            digest = _combine(fingerprint.encode(), pieces)
            trailer = json.dumps({
                "format": FORMAT_VERSION, "payload": writer.written, "piece": PIECE,
                "checksum": checksum, "fingerprint": fingerprint, "digest": digest.hex(),
                "pieces": [p.hex() for p in pieces],
            }, sort_keys=True).encode()
            file.write(BEGIN + trailer + b"\n" + b"%0*d" % (_LENGTH_DIGITS, len(trailer)) + END)
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
    took = time.monotonic() - started
    for listener in list(_SAVED):
        with suppress(Exception):
            listener(path, took)


_SAVED: List[Callable[[str, float], None]] = []


def on_saved(listener: Callable[[str, float], None]) -> Callable[[], None]:
    """Call `listener(path, seconds)` after each checkpoint this process writes (from the
    writing thread; an error in it is ignored); returns what removes it. The in-place runtime
    reports the durations to its agent, for its metrics."""
    _SAVED.append(listener)
    return lambda: _SAVED.remove(listener) if listener in _SAVED else None


_ADVICE = "it cannot be used — restore an older one or start fresh"


def load_checkpoint(path: str, *, fingerprint: Optional[str] = None, map_location: Any = "cpu",
                    weights_only: bool = True, mmap: bool = False) -> dict:
    """Read a checkpoint written by save_checkpoint, after checking its length and checksums.

    `weights_only` is passed to torch.load: the checksum proves the file is intact, not that it
    comes from someone you trust, so arbitrary pickles stay off unless asked for. With `mmap`
    (format 2) the tensors are the file's pages mapped copy-on-write, the ones the check just
    read into the page cache, rather than a second copy read from it: the quickest way to copy a
    checkpoint into a model (`load_state_dict`) and drop it. Not for state kept for long: as with
    torch.load(mmap=True), the file must not be truncated or rewritten in place meanwhile
    (SIGBUS); a replacement by rename, as save_checkpoint does, is safe.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointCorrupted: truncated, altered, or not a checkpoint.
        CheckpointMismatch: `fingerprint` is given and differs from the file's.
        CheckpointError: written by another format version.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if file.read(len(_V1_MAGIC)) == _V1_MAGIC:
            return _load_v1(path, file, size, fingerprint, map_location, weights_only)
        meta = _read_trailer(path, file, size)
        payload, piece = meta["payload"], meta["piece"]
        fp = str(meta["fingerprint"]).encode()
        expected = _expected_pieces(path, meta, fp)
        check = _PayloadCheck(file.fileno(), payload, fp, piece, meta["checksum"])
        try:
            # Damaged bytes are never parsed: the pieces holding what torch.load parses (the
            # zip's directory, the pickle) are checked first; the tensors' bytes, which it only
            # copies, are checked on other cores while it reads them, and the result is dropped
            # unless every piece matched.
            if not _check_parsed_first(file, payload, piece, expected, check) or (
                    fingerprint is not None and meta["fingerprint"] != fingerprint):
                _match(path, meta, check.digest())  # damaged, or another model's: all first
                _check_fingerprint(path, meta["fingerprint"], fingerprint)
            check.start_rest()
            # The file just checked, not whatever the path names by now.
            same_file = f"/proc/self/fd/{file.fileno()}"
            source = same_file if os.path.exists(same_file) else path
            try:
                state = torch.load(source, map_location=map_location, weights_only=weights_only,
                                   mmap=mmap)
            except Exception:
                _match(path, meta, check.digest())  # damage first; else torch's own error
                raise
            _match(path, meta, check.digest())
        finally:
            check.close()
        return state


def _check_parsed_first(file: Any, payload: int, piece: int,
                        expected: Optional[List[bytes]], check: _PayloadCheck) -> bool:
    """Check the pieces holding what torch.load parses: the central directory and the records'
    headers first, then (their lengths now trusted) the records. False when that cannot be done
    or a piece does not match (the caller then checks everything and says which)."""
    if expected is None:
        return False
    found = _parsed_records(file, payload)
    if found is None:
        return False
    directory, records = found
    heads = [i for offset, _ in records for i in _pieces(offset, offset + 30, piece)]
    if not check.first(_pieces(*directory, piece) + heads, expected):
        return False
    spans = _record_spans(file, records, payload)
    return spans is not None and check.first(
        [i for begin, end in spans for i in _pieces(begin, end, piece)], expected)


def _expected_pieces(path: str, meta: dict, fingerprint: bytes) -> Optional[List[bytes]]:
    """Each piece's checksum from the trailer, once they are shown to make its digest; None for
    a file written without them."""
    listed = meta.get("pieces")
    if listed is None:
        return None
    try:
        pieces = [bytes.fromhex(p) for p in listed]
    except (TypeError, ValueError):
        pieces = []
    count = -(-meta["payload"] // meta["piece"])
    if len(pieces) != count or _combine(fingerprint, pieces).hex() != meta["digest"]:
        _match(path, meta, b"")  # the trailer is damaged: reported as any damage
    return pieces


def _match(path: str, meta: dict, actual: bytes) -> None:
    if actual.hex() != meta["digest"]:
        raise CheckpointCorrupted(
            f"checkpoint {path} is corrupted (its {meta['checksum']} checksums do not match "
            f"the ones recorded when it was written); {_ADVICE}")


def _read_trailer(path: str, file: io.BufferedReader, size: int) -> dict:
    file.seek(max(0, size - _TAIL))
    tail = file.read(_TAIL)
    if len(tail) < _TAIL or not tail.endswith(END) or not tail[:_LENGTH_DIGITS].isdigit():
        if size >= 4:
            file.seek(0)
            first = file.read(4)
            if first != b"PK\x03\x04":
                raise CheckpointCorrupted(f"{path} is not a checkpoint written by elastic (its "
                                          f"first bytes are {first!r}); {_ADVICE}")
        raise CheckpointCorrupted(
            f"checkpoint {path} is truncated, or not a checkpoint written by elastic (found "
            f"{size} bytes, without elastic's end marker); {_ADVICE}")
    length = int(tail[:_LENGTH_DIGITS])
    begin = size - _TAIL - 1 - length - len(BEGIN)
    meta: Any = None
    if begin >= 0:
        file.seek(begin)
        framed = file.read(len(BEGIN) + length + 1)
        if framed.startswith(BEGIN) and framed.endswith(b"\n"):
            with suppress(ValueError):
                meta = json.loads(framed[len(BEGIN):-1])
    if not isinstance(meta, dict):
        raise CheckpointCorrupted(f"checkpoint {path} is corrupted (its trailer cannot be read); "
                                  f"{_ADVICE}")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format')}; this "
                              f"version of elastic reads versions 1 and {FORMAT_VERSION}")
    well_formed = (isinstance(meta.get("payload"), int) and isinstance(meta.get("piece"), int)
                   and meta["piece"] > 0 and meta.get("checksum") in CHECKSUMS
                   and isinstance(meta.get("digest"), str)
                   and isinstance(meta.get("fingerprint"), str))
    if not well_formed:
        raise CheckpointCorrupted(f"checkpoint {path} is corrupted (its trailer lacks a field); "
                                  f"{_ADVICE}")
    if meta["payload"] != begin:
        raise CheckpointCorrupted(f"checkpoint {path} is corrupted (expected "
                                  f"{meta['payload'] + size - begin} bytes, found {size}); "
                                  f"{_ADVICE}")
    return meta


def _check_fingerprint(path: str, saved_for: str, fingerprint: Optional[str]) -> None:
    if fingerprint is not None and saved_for != fingerprint:
        raise CheckpointMismatch(
            f"checkpoint {path} was written for another model (fingerprint {saved_for}, this "
            f"model's is {fingerprint}: parameter names, shapes or dtypes differ); load it "
            "into the model it was saved from, or start fresh")


def _load_v1(path: str, file: io.BufferedReader, size: int, fingerprint: Optional[str],
             map_location: Any, weights_only: bool) -> dict:
    """Format 1: a header before the payload, SHA-256 pieces; read as before."""
    file.seek(0)
    fixed = file.read(_V1_FIXED.size)
    if len(fixed) < _V1_FIXED.size:
        raise CheckpointCorrupted(f"checkpoint {path} is truncated (found {size} bytes, fewer "
                                  f"than its {_V1_FIXED.size}-byte header); {_ADVICE}")
    _, version, fp_len, payload_len, digest = _V1_FIXED.unpack(fixed)
    if version != 1:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this version "
                              f"of elastic reads versions 1 and {FORMAT_VERSION}")
    expected = _V1_FIXED.size + fp_len + payload_len + len(_V1_TRAILER)
    if size != expected:
        what = "truncated" if size < expected else "corrupted"
        raise CheckpointCorrupted(f"checkpoint {path} is {what} (expected {expected} bytes, "
                                  f"found {size}); {_ADVICE}")
    fp = file.read(fp_len)
    start = _V1_FIXED.size + fp_len
    actual = _payload_digest(file.fileno(), start, payload_len, fp, 64 << 20, "sha256")
    file.seek(start + payload_len)
    if file.read() != _V1_TRAILER or actual != digest:
        raise CheckpointCorrupted(f"checkpoint {path} is corrupted (its SHA-256 does not match "
                                  f"the one recorded when it was written); {_ADVICE}")
    _check_fingerprint(path, fp.decode(errors="replace"), fingerprint)
    # Unbuffered: torch reads whole records, an extra buffer would only add a copy.
    return torch.load(_Window(file, start, payload_len), map_location=map_location,
                      weights_only=weights_only)


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
    change them right away) and returns while a thread writes the copy; with copy=False it
    writes `state` itself, which the caller leaves alone while `writing` is it (ElasticState
    hands over its committed snapshot this way and commits into fresh buffers meanwhile, so a
    save costs the training thread nothing). A save while a write is
    in flight *waits* for that write first rather than superseding it: every requested
    checkpoint lands, memory holds at most one extra copy, and a disk slower than the save
    rate slows training down instead of silently dropping checkpoints. A failed write is raised,
    as CheckpointError, by the next `save()` or `wait()`.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._state: Optional[dict] = None  # what the thread writes
        self._failure: Optional[tuple[str, BaseException]] = None
        self._closed = False

    @property
    def writing(self) -> Optional[dict]:
        """The state a write still in flight is writing (None when none is)."""
        if self._thread is not None and self._thread.is_alive():
            return self._state
        return None

    def save(self, path: str, state: dict, *, fingerprint: str,
             checksum: str = DEFAULT_CHECKSUM, copy: bool = True) -> None:
        """Write `state` (a snapshot of it now, unless copy=False) to `path` in the background."""
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed")
        _hasher(checksum)  # an unknown name fails here, not on the writing thread
        self.wait()
        snapshot = self._state = _cpu_snapshot(state) if copy else state
        self._thread = threading.Thread(
            target=self._write, args=(os.fspath(path), snapshot, fingerprint, checksum),
            name="elastic-checkpoint", daemon=False)  # not daemon: exit waits for the write
        self._thread.start()

    def _write(self, path: str, snapshot: dict, fingerprint: str, checksum: str) -> None:
        try:
            save_checkpoint(path, snapshot, fingerprint=fingerprint, checksum=checksum)
        except BaseException as exc:  # handed to the training thread by wait()
            self._failure = (path, exc)

    def wait(self) -> None:
        """Block until the write in flight, if any, has finished; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = self._state = None
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
