"""Parsing the etcd endpoints users type."""
import re

import pytest

from rendezvous.connect import DEFAULT_PORT, format_endpoint, parse_endpoint


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:2379", ("127.0.0.1", 2379)),
    ("etcd://127.0.0.1:1234", ("127.0.0.1", 1234)),
    ("http://node-3.cluster:4000", ("node-3.cluster", 4000)),
    ("HTTP://node-3:4000/", ("node-3", 4000)),
    ("  10.0.0.5:65535 ", ("10.0.0.5", 65535)),
    ("localhost", ("localhost", DEFAULT_PORT)),
    ("etcd://10.0.0.5", ("10.0.0.5", DEFAULT_PORT)),
    ("[::1]:2400", ("::1", 2400)),
    ("[fe80::1]", ("fe80::1", DEFAULT_PORT)),
])
def test_parses(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text, says", [
    ("", "no valid host"),
    (":2379", "no valid host"),
    ("etcd://", "no valid host"),
    ("host:", "invalid port"),
    ("host:http", "invalid port"),
    ("host:0", "invalid port"),
    ("host:65536", "invalid port"),
    ("host:-1", "invalid port"),
    ("https://host:2379", "unsupported scheme"),
    ("unix:///tmp/etcd.sock", "unsupported scheme"),
    ("::1:2379", "brackets"),
    ("[::1", "[IPV6]:PORT"),
    ("[::1]2379", "[IPV6]:PORT"),
    ("user@host:2379", "no valid host"),
    ("host:2379/path", "invalid port"),
])
def test_rejects_with_a_reason(text, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_endpoint(text)


def test_rejects_non_strings():
    with pytest.raises(ValueError, match="must be a string"):
        parse_endpoint(2379)


@pytest.mark.parametrize("host, port, text", [
    ("127.0.0.1", 2379, "127.0.0.1:2379"),
    ("::1", 2400, "[::1]:2400"),
])
def test_format_round_trips(host, port, text):
    assert format_endpoint(host, port) == text
    assert parse_endpoint(text) == (host, port)
