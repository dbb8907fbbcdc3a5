"""Preemption notices: word that this node is about to be taken away, from any source.

Sources (the first notice wins; more are plugged in as `NoticeSource`s, e.g. the Kubernetes one
in integrations/kubernetes):
    sigterm   the agent's SIGTERM handler calls `NoticeWatcher.notify_signal`.
    file      a path whose appearance is the notice (a drain hook can `touch` it); its content, if
              any, is the detail. It is read when first seen: write elsewhere and rename onto it.
    metadata  an HTTP endpoint polled every `poll_interval`, read through a preset:
        aws      .../latest/meta-data/spot/instance-action answers 404 until a reclaim is
                 scheduled (about two minutes ahead), then 200 with JSON {"action": terminate,
                 stop or hibernate, "time": UTC ISO 8601}; "time" is the deadline. An unreadable
                 time still counts as a notice (the action is what matters).
        gce      .../computeMetadata/v1/instance/preempted answers only requests carrying
                 `Metadata-Flavor: Google`: FALSE, then TRUE once preempted. No time is stated
                 (GCE allows about 30 s).
        generic  200 with a non-empty body other than false (any case) or 0 is a notice, the
                 body its detail; such a body, 204 or 404 is none.
      aws and gce carry their cloud's link-local URL, so choosing one enables polling; generic
      polls only when given a URL.
A notice without a stated deadline gets received_at + default_grace.

A misbehaving source (unreachable endpoint, 5xx, a body that fits no convention, an unreadable
notice file) must not stop training: one warning per distinct problem, repeated only when the
problem changes or after the source recovered, and polling goes on.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Callable, Dict, Mapping, Optional, Protocol, Tuple
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_GRACE_S = 30.0
# A metadata server answers in milliseconds; a slow one must not delay the next check for long.
MAX_HTTP_TIMEOUT_S = 2.0
MAX_DETAIL_BYTES = 4096
EMPTY_FILE_SETTLE_S = 0.05  # a notice file found empty is read once more after this

SIGTERM, FILE, METADATA = "sigterm", "file", "metadata"

ParseResult = Optional[Tuple[str, Optional[float]]]


class MetadataResponseError(ValueError):
    """A metadata response that fits none of its preset's conventions."""


class NoticeSourceError(Exception):
    """A source that cannot be read now; the message says what to check. Polling goes on."""


class NoticeSource(Protocol):
    """One place a notice can come from, polled every poll_interval on the watcher's thread."""

    name: str   # the Notice's source, e.g. "file", "metadata", "kubernetes"
    # Optional: `exit_code`, what the agent exits with after leaving on this source's notice
    # (0 when absent: a planned departure; the GPU health source says 1, a fault).

    def check(self) -> ParseResult:
        """(detail, deadline or None) once this node is to go away, None until then.

        Raises:
            NoticeSourceError: the source cannot be read now (warned once per distinct message).
        """


@dataclass(frozen=True)
class Notice:
    source: str                 # the signal ("sigterm", "sigint") or the source's name
    detail: str                 # the file's content, the metadata's action and time, the signal
    deadline: Optional[float]   # unix time by which the node goes away; None: unknown
    received_at: float
    exit_code: int = 0          # the agent's exit code once it has left (a signal's wins)


@dataclass(frozen=True)
class MetadataPreset:
    """How to poll one kind of metadata endpoint and read its answer."""
    name: str
    url: str                    # "" when the preset has no default endpoint
    headers: Mapping[str, str]
    parse: Callable[[int, bytes], ParseResult]   # (status, body) -> (detail, deadline) or None


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip()


def _unexpected(status: int, body: bytes) -> MetadataResponseError:
    return MetadataResponseError(f"unexpected answer HTTP {status}: {_text(body)[:80]!r}")


def _utc_seconds(stamp: object) -> Optional[float]:
    try:
        when = datetime.fromisoformat(str(stamp).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def parse_aws(status: int, body: bytes) -> ParseResult:
    if status == 404:
        return None
    if status != 200:
        raise _unexpected(status, body)
    try:
        doc = json.loads(body)
    except ValueError:
        raise MetadataResponseError(f"instance-action is not JSON: {_text(body)[:80]!r}") from None
    action = doc.get("action") if isinstance(doc, dict) else None
    if not isinstance(action, str) or not action:
        raise MetadataResponseError(f"instance-action has no action: {_text(body)[:80]!r}")
    return f"{action} at {doc.get('time')}", _utc_seconds(doc.get("time"))


def parse_gce(status: int, body: bytes) -> ParseResult:
    answer = _text(body).upper()
    if status != 200 or answer not in ("TRUE", "FALSE"):
        raise _unexpected(status, body)
    return ("preempted", None) if answer == "TRUE" else None


def parse_generic(status: int, body: bytes) -> ParseResult:
    if status in (204, 404):
        return None
    if status != 200:
        raise _unexpected(status, body)
    text = _text(body)
    return None if text.lower() in ("", "false", "0") else (text, None)


PRESETS: Dict[str, MetadataPreset] = {
    "aws": MetadataPreset("aws", "http://169.254.169.254/latest/meta-data/spot/instance-action",
                          MappingProxyType({}), parse_aws),
    "gce": MetadataPreset("gce",
                          "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
                          MappingProxyType({"Metadata-Flavor": "Google"}), parse_gce),
    "generic": MetadataPreset("generic", "", MappingProxyType({}), parse_generic),
}


def make_preset(name: str, url: Optional[str] = None) -> MetadataPreset:
    """The preset called `name`, polling `url` instead of its default when given.

    Raises:
        ValueError: no preset has that name.
    """
    if name not in PRESETS:
        raise ValueError(f"--preemption-preset must be one of {', '.join(PRESETS)}; got {name!r}")
    return dataclasses.replace(PRESETS[name], url=url) if url else PRESETS[name]


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True)
class NoticeConfig:
    notice_file: Optional[str] = None      # --preemption-file
    metadata_url: Optional[str] = None     # --preemption-url (overrides the preset's URL)
    metadata_preset: str = "generic"       # --preemption-preset: aws | gce | generic
    poll_interval: float = DEFAULT_POLL_INTERVAL_S   # --preemption-poll-interval
    default_grace: float = DEFAULT_GRACE_S           # --preemption-grace
    extra: Tuple[NoticeSource, ...] = ()             # plugged-in sources (--preemption-k8s)

    def __post_init__(self):
        if self.notice_file == "":
            raise ValueError("--preemption-file is empty; pass a path or leave the flag out")
        if not 0 < self.poll_interval < float("inf"):
            raise ValueError(f"--preemption-poll-interval must be a positive number of seconds, "
                             f"got {self.poll_interval}")
        if not 0 <= self.default_grace < float("inf"):
            raise ValueError(f"--preemption-grace must be zero or more seconds, "
                             f"got {self.default_grace}")
        make_preset(self.metadata_preset)
        if self.metadata_url is not None and not _is_http_url(self.metadata_url):
            raise ValueError(f"--preemption-url must be an http:// or https:// URL with a host, "
                             f"got {self.metadata_url!r}")

    def metadata(self) -> Optional[MetadataPreset]:
        """The endpoint to poll, or None when metadata polling is off."""
        preset = make_preset(self.metadata_preset, self.metadata_url)
        return preset if preset.url else None

    def sources(self) -> Tuple[NoticeSource, ...]:
        """What to poll, in order: the notice file, the metadata endpoint, the plugged-in ones."""
        found: list = []
        if self.notice_file is not None:
            found.append(FileSource(self.notice_file))
        preset = self.metadata()
        if preset is not None:
            found.append(MetadataSource(preset, min(self.poll_interval, MAX_HTTP_TIMEOUT_S)))
        return (*found, *self.extra)


def fetch(url: str, headers: Mapping[str, str], timeout: float) -> Tuple[int, bytes]:
    """GET url directly (no proxy from the environment: metadata servers are link-local)."""
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers=dict(headers))
        response = conn.getresponse()
        return response.status, response.read(MAX_DETAIL_BYTES)
    finally:
        conn.close()


class FileSource:
    """--preemption-file: the file's appearance is the notice, its text the detail."""

    name = FILE

    def __init__(self, path: str) -> None:
        self.path = path

    def check(self) -> ParseResult:
        detail = self._read()
        if detail == "":
            # Maybe seen between its creation and the write of its text (`echo x > file`):
            # a moment later the text is there, if it has any.
            time.sleep(EMPTY_FILE_SETTLE_S)
            detail = self._read() or ""
        return None if detail is None else (detail, None)

    def _read(self) -> Optional[str]:
        try:
            with open(self.path, "rb") as f:
                return _text(f.read(MAX_DETAIL_BYTES))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise NoticeSourceError(
                f"preemption notice file {self.path} cannot be read ({exc}); polling goes on; "
                f"check --preemption-file") from None


class MetadataSource:
    """--preemption-url / --preemption-preset: an HTTP endpoint read through its preset."""

    name = METADATA

    def __init__(self, preset: MetadataPreset, timeout: float) -> None:
        self.preset, self.timeout = preset, timeout

    def check(self) -> ParseResult:
        preset = self.preset
        try:
            return preset.parse(*fetch(preset.url, preset.headers, self.timeout))
        except (OSError, http.client.HTTPException) as exc:
            problem = f"cannot reach it ({str(exc) or type(exc).__name__})"
        except MetadataResponseError as exc:
            problem = str(exc)
        raise NoticeSourceError(
            f"preemption metadata endpoint {preset.url} ({preset.name}): {problem}; polling goes "
            f"on; check --preemption-url and --preemption-preset")


class NoticeWatcher:
    """Polls the configured sources on a daemon thread and hands the first notice from any of
    them (or from notify_signal) to on_notice, once."""

    def __init__(self, config: NoticeConfig, on_notice: Callable[[Notice], None],
                 clock: Callable[[], float] = time.time,
                 warn: Callable[[str], None] = log.warning):
        self.config = config
        self._on_notice = on_notice
        self._clock = clock
        self._warn = warn
        self._sources = config.sources()
        self._timeout = min(config.poll_interval, MAX_HTTP_TIMEOUT_S)
        self._problems: Dict[str, Optional[str]] = {}
        # notify_signal runs in a signal handler, which may interrupt this very thread inside
        # _deliver: reentrant, so that cannot deadlock.
        self._lock = threading.RLock()
        self._notice: Optional[Notice] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="preemption-watch", daemon=True)

    @property
    def notice(self) -> Optional[Notice]:
        """The notice that won, once there is one."""
        return self._notice

    def start(self) -> None:
        """Start polling, if there is any source to poll."""
        if self._sources:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout + 1.0)

    def notify_signal(self, signame: str) -> Notice:
        """Turn a signal the agent received into a notice; returns the notice that won. Safe in
        a signal handler, where on_notice then runs too."""
        return self._deliver(signame.lower(), signame, None)

    def check_once(self) -> Optional[Notice]:
        """Look at every source in order; returns the notice that won, or None yet."""
        for source in self._sources:
            if self._notice is not None:
                break
            found = problem = None
            try:
                found = source.check()
            except NoticeSourceError as exc:
                problem = str(exc)
            except Exception as exc:  # a broken plug-in must not stop the other sources
                problem = (f"preemption source {source.name} failed ({type(exc).__name__}: "
                           f"{exc}); polling goes on")
            self._report(source.name, problem)
            if found is not None:
                return self._deliver(source.name, found[0], found[1],
                                     getattr(source, "exit_code", 0))
        return self._notice

    def _report(self, source: str, problem: Optional[str]) -> None:
        last = self._problems.get(source)
        self._problems[source] = problem
        if problem is not None and problem != last:
            self._warn(problem)
        elif problem is None and last is not None:
            log.info("preemption %s source works again", source)

    def _deliver(self, source: str, detail: str, deadline: Optional[float],
                 exit_code: int = 0) -> Notice:
        received_at = self._clock()
        notice = Notice(source, detail, deadline if deadline is not None
                        else received_at + self.config.default_grace, received_at, exit_code)
        with self._lock:
            if self._notice is not None:
                return self._notice
            self._notice = notice
        try:
            self._on_notice(notice)
        except Exception:  # the notice stands; a broken callback must not kill the watcher
            log.exception("preemption notice handler failed for %s", notice)
        return notice

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.check_once() is not None:
                return
            self._stop.wait(self.config.poll_interval)
