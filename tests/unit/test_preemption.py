import socket
import threading
from datetime import datetime, timezone

import pytest

from tests.support import MetadataServer

from launcher.preemption import (
    FILE, METADATA, SIGTERM, Notice, NoticeConfig, NoticeWatcher, make_preset, parse_aws,
    parse_gce, parse_generic,
)

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def server():
    srv = MetadataServer()
    yield srv
    srv.close()


class Recorder:
    def __init__(self):
        self.notices, self.warnings = [], []

    def watcher(self, clock=None, **config):
        return NoticeWatcher(NoticeConfig(**config), self.notices.append,
                             clock=clock or Clock(), warn=self.warnings.append)


@pytest.fixture
def rec():
    return Recorder()


def test_a_file_seen_before_its_text_is_written_still_gives_its_text(tmp_path, rec,
                                                                     monkeypatch):
    path = tmp_path / "preempted"
    path.write_text("")  # created; its writer has not written yet
    # The writer finishes while the watcher waits to look again.
    monkeypatch.setattr("launcher.preemption.time.sleep", lambda _s: path.write_text("bye"))
    w = rec.watcher(notice_file=str(path))
    assert w.check_once().detail == "bye"
    assert [n.detail for n in rec.notices] == ["bye"]


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/notice"


# --- the notice file ----------------------------------------------------------------------------

def test_file_appearing_is_a_notice_with_its_content(tmp_path, rec):
    path = tmp_path / "preempted"
    w = rec.watcher(notice_file=str(path), default_grace=45.0)
    assert w.check_once() is None

    path.write_text("drain: maintenance window\n")
    notice = w.check_once()

    assert notice == Notice(FILE, "drain: maintenance window", T0 + 45.0, T0)
    assert rec.notices == [notice] and rec.warnings == []


def test_empty_file_is_a_notice_too(tmp_path, rec):
    path = tmp_path / "preempted"
    path.touch()
    assert rec.watcher(notice_file=str(path)).check_once() == Notice(FILE, "", T0 + 30.0, T0)


def test_unreadable_file_warns_once_and_metadata_still_arrives(tmp_path, server, rec):
    path = tmp_path / "preempted"
    path.mkdir()
    w = rec.watcher(notice_file=str(path), metadata_url=server.url())

    for _ in range(3):
        assert w.check_once() is None
    assert len(rec.warnings) == 1
    assert str(path) in rec.warnings[0] and "--preemption-file" in rec.warnings[0]

    server.answer(200, b"node is being reclaimed")
    notice = w.check_once()
    assert (notice.source, notice.detail) == (METADATA, "node is being reclaimed")
    assert rec.notices == [notice] and len(rec.warnings) == 1


def test_a_notice_file_that_exists_but_cannot_be_read_warns_once(tmp_path, rec):
    # A socket at the path: there, yet open() fails for everyone, root included (a file without
    # read permission would not do under root, which CI runs as).
    path = tmp_path / "preempted"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        w = rec.watcher(notice_file=str(path))
        assert w.check_once() is None and w.check_once() is None
    assert len(rec.warnings) == 1
    assert f"preemption notice file {path} cannot be read" in rec.warnings[0]


def test_file_problem_warns_again_after_recovering(tmp_path, rec):
    path = tmp_path / "preempted"
    w = rec.watcher(notice_file=str(path))
    path.mkdir()
    w.check_once()
    path.rmdir()
    w.check_once()              # recovered: no file, no problem
    path.mkdir()
    w.check_once()
    assert len(rec.warnings) == 2 and rec.notices == []


# --- metadata endpoints -------------------------------------------------------------------------

def test_aws_404_is_no_notice_then_instance_action_gives_the_deadline(server, rec):
    w = rec.watcher(metadata_url=server.url(), metadata_preset="aws")
    server.answer(404, b"Not Found")
    assert w.check_once() is None

    server.answer(200, b'{"action": "terminate", "time": "2027-01-15T08:30:00Z"}')
    notice = w.check_once()

    expected = datetime(2027, 1, 15, 8, 30, tzinfo=timezone.utc).timestamp()
    assert notice == Notice(METADATA, "terminate at 2027-01-15T08:30:00Z", expected, T0)
    assert rec.notices == [notice] and rec.warnings == []


def test_aws_notice_with_an_unreadable_time_gets_the_default_grace(server, rec):
    w = rec.watcher(metadata_url=server.url(), metadata_preset="aws", default_grace=10.0)
    server.answer(200, b'{"action": "stop", "time": "soon"}')
    assert w.check_once().deadline == T0 + 10.0


def test_malformed_aws_json_warns_and_gives_no_notice(server, rec):
    w = rec.watcher(metadata_url=server.url(), metadata_preset="aws")
    server.answer(200, b'{"action": ')
    assert w.check_once() is None and w.check_once() is None
    assert len(rec.warnings) == 1 and "not JSON" in rec.warnings[0]
    assert rec.notices == []


def test_gce_sends_metadata_flavor_and_preempted_true_is_a_notice(server, rec):
    clock = Clock()
    w = rec.watcher(clock, metadata_url=server.url("/computeMetadata/v1/instance/preempted"),
                    metadata_preset="gce", default_grace=25.0)
    server.answer(200, b"FALSE")
    assert w.check_once() is None

    clock.now += 7.0
    server.answer(200, b"TRUE")
    notice = w.check_once()

    assert notice == Notice(METADATA, "preempted", T0 + 7.0 + 25.0, T0 + 7.0)
    assert all(headers.get("Metadata-Flavor") == "Google" for _, headers in server.requests)
    assert server.requests[0][0] == "/computeMetadata/v1/instance/preempted"
    assert len(server.requests) == 2 and rec.warnings == []


@pytest.mark.parametrize("body", [b"", b"FALSE", b"false", b"0", b"  false\n"])
def test_generic_false_bodies_are_no_notice(server, rec, body):
    server.answer(200, body)
    assert rec.watcher(metadata_url=server.url()).check_once() is None
    assert rec.warnings == []


def test_generic_body_is_the_detail(server, rec):
    server.answer(200, b"reclaim at 14:00\n")
    notice = rec.watcher(metadata_url=server.url()).check_once()
    assert notice == Notice(METADATA, "reclaim at 14:00", T0 + 30.0, T0)


def test_unreachable_endpoint_warns_once_over_several_polls(rec):
    w = rec.watcher(metadata_url=closed_port_url(), poll_interval=0.2)
    for _ in range(4):
        assert w.check_once() is None
    assert len(rec.warnings) == 1
    assert "cannot reach" in rec.warnings[0] and "--preemption-url" in rec.warnings[0]
    assert rec.notices == []


def test_endpoint_that_never_answers_times_out_with_one_warning(rec):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)      # connections queue up, nothing ever answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/notice"
        w = rec.watcher(metadata_url=url, poll_interval=0.05)
        for _ in range(3):
            assert w.check_once() is None
    assert len(rec.warnings) == 1 and "timed out" in rec.warnings[0]


def test_server_error_warns_and_a_different_error_warns_again(server, rec):
    w = rec.watcher(metadata_url=server.url(), metadata_preset="aws")
    server.answer(500, b"oops")
    w.check_once()
    w.check_once()
    assert len(rec.warnings) == 1 and "HTTP 500" in rec.warnings[0]

    server.answer(503, b"busy")
    w.check_once()
    assert len(rec.warnings) == 2 and "HTTP 503" in rec.warnings[1]

    server.answer(404)
    w.check_once()              # recovered
    server.answer(503, b"busy")
    w.check_once()
    assert len(rec.warnings) == 3 and rec.notices == []


def test_preset_url_is_replaced_and_generic_has_none():
    aws = make_preset("aws")
    assert aws.url == "http://169.254.169.254/latest/meta-data/spot/instance-action"
    assert make_preset("aws", "http://127.0.0.1:9/x").url == "http://127.0.0.1:9/x"
    assert make_preset("gce").headers == {"Metadata-Flavor": "Google"}
    assert NoticeConfig(metadata_preset="aws").metadata().url == aws.url
    assert NoticeConfig().metadata() is None


def test_parsers_are_pure():
    assert parse_aws(404, b"") is None
    assert parse_aws(200, b'{"action": "hibernate", "time": "2027-01-15T08:30:00Z"}')[0] == \
        "hibernate at 2027-01-15T08:30:00Z"
    assert parse_gce(200, b"TRUE\n") == ("preempted", None)
    assert parse_generic(404, b"") is None
    for parse, status, body in [(parse_aws, 200, b"[]"), (parse_aws, 200, b'{"time": "x"}'),
                                (parse_gce, 200, b"maybe"), (parse_gce, 404, b""),
                                (parse_generic, 502, b"")]:
        with pytest.raises(ValueError):
            parse(status, body)


# --- first notice wins, signals, the thread -----------------------------------------------------

def test_first_notice_wins(tmp_path, server, rec):
    path = tmp_path / "preempted"
    path.write_text("file first")
    server.answer(200, b"metadata too")
    w = rec.watcher(notice_file=str(path), metadata_url=server.url())

    first = w.check_once()
    assert first.source == FILE
    assert w.check_once() is first
    assert w.notify_signal("SIGTERM") is first
    assert rec.notices == [first] and w.notice is first
    assert server.requests == []    # the file was checked first and settled it


def test_notify_signal_is_a_notice_with_the_default_grace(rec):
    clock = Clock()
    w = rec.watcher(clock, default_grace=12.5)
    notice = w.notify_signal("SIGTERM")
    assert notice == Notice(SIGTERM, "SIGTERM", T0 + 12.5, T0)
    assert rec.notices == [notice]


def test_a_failing_callback_does_not_undo_the_notice(tmp_path):
    def explode(notice):
        raise RuntimeError("boom")

    w = NoticeWatcher(NoticeConfig(), explode, clock=Clock())
    notice = w.notify_signal("SIGTERM")
    assert w.notice is notice and w.notify_signal("SIGTERM") is notice


def test_thread_delivers_a_notice_when_the_file_appears(tmp_path):
    path = tmp_path / "preempted"
    fired = threading.Event()
    got = []
    w = NoticeWatcher(NoticeConfig(notice_file=str(path), poll_interval=0.01),
                      lambda n: (got.append(n), fired.set()))
    w.start()
    try:
        assert not fired.wait(0.05)
        path.write_text("bye")
        assert fired.wait(5.0)
    finally:
        w.stop()
    assert [n.detail for n in got] == ["bye"]
    assert "preemption-watch" not in [t.name for t in threading.enumerate()]


def test_stop_joins_a_thread_still_polling(server):
    w = NoticeWatcher(NoticeConfig(metadata_url=server.url(), poll_interval=0.01),
                      lambda n: None)
    w.start()
    w.stop()
    assert "preemption-watch" not in [t.name for t in threading.enumerate()]


def test_start_without_sources_starts_no_thread():
    w = NoticeWatcher(NoticeConfig(), lambda n: None)
    w.start()
    assert "preemption-watch" not in [t.name for t in threading.enumerate()]
    w.stop()


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    (dict(poll_interval=0), "--preemption-poll-interval"),
    (dict(poll_interval=-1.0), "--preemption-poll-interval"),
    (dict(poll_interval=float("nan")), "--preemption-poll-interval"),
    (dict(default_grace=-5.0), "--preemption-grace"),
    (dict(metadata_preset="azure"), "--preemption-preset"),
    (dict(metadata_url="ftp://127.0.0.1/notice"), "--preemption-url"),
    (dict(metadata_url="127.0.0.1:8080/notice"), "--preemption-url"),
    (dict(metadata_url="http://127.0.0.1:port/notice"), "--preemption-url"),
    (dict(notice_file=""), "--preemption-file"),
])
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        NoticeConfig(**kwargs)


def test_preset_error_lists_the_choices():
    with pytest.raises(ValueError, match="aws, gce, generic; got 'azure'"):
        make_preset("azure")


def test_config_accepts_https_and_zero_grace():
    config = NoticeConfig(metadata_url="https://127.0.0.1:8443/n", default_grace=0.0)
    assert config.metadata().url == "https://127.0.0.1:8443/n"

